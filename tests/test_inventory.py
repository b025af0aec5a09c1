"""The shipped inventory matches today's Raspberry Pi OS (issue 9 §2).

Raspberry Pi OS has had no default ``pi`` user since 2022: a fleet flashed with
the Imager's defaults logs in as the user created in the Imager. Only the
demo's generated inventory (molecule/resources/demo.sh), whose containers do
have ``pi``, may name it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

PIS = Path(__file__).resolve().parents[1] / "inventory" / "pis"


def ansible_users(node: object) -> list[object]:
    """Every value given to ansible_user anywhere in a loaded YAML document."""
    found: list[object] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ansible_user":
                found.append(value)
            found.extend(ansible_users(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(ansible_users(item))
    return found


def test_the_shipped_inventory_assumes_no_pi_user():
    files = sorted(PIS.rglob("*.yml"))
    assert PIS / "hosts.yml" in files
    users = [user for path in files for user in ansible_users(yaml.safe_load(path.read_text()))]
    assert "pi" not in users


def test_hosts_yml_tells_where_the_login_user_comes_from():
    text = (PIS / "hosts.yml").read_text(encoding="utf-8")
    assert ansible_users(yaml.safe_load(text)) != []
    assert "Raspberry Pi Imager" in text
