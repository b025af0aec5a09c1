"""The master's firewall (rpicluster_master_firewall): what the role renders from what.

``roles/rpicluster_master/files/resolve_addresses.py`` runs on the master with its
python3 and turns the inventory's hosts into addresses; the template makes the
nftables table from them. Molecule's default scenario loads it for real (verify:
the docker host is dropped at the master's ports, the slaves are not, a table of
the user's own survives a reload); here the pieces, without a network.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROLE = Path(__file__).resolve().parent.parent / "roles" / "rpicluster_master"


def resolve(hosts: list[list[str]], allowed: list[str]) -> dict:
    run = subprocess.run(
        [
            sys.executable,
            str(ROLE / "files" / "resolve_addresses.py"),
            json.dumps(hosts),
            json.dumps(allowed),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(run.stdout)


def test_hosts_are_their_ansible_host_else_their_name_and_networks_pass_through():
    found = resolve(
        [["rpi-master", "127.0.0.9"], ["localhost", ""], ["rpi-node-09", "::1"]],
        ["192.168.1.0/24", "10.0.0.5", "192.168.1.7"],
    )
    assert found["v4"] == [
        "10.0.0.5/32",
        "127.0.0.1/32",
        "127.0.0.9/32",
        "192.168.1.0/24",
        "192.168.1.7/32",
    ]
    assert found["v6"] == ["::1/128"]
    assert found["unresolved"] == []


def test_a_name_the_master_cannot_resolve_is_named():
    found = resolve([["rpi-node-07.invalid", ""], ["rpi-node-08", "127.0.0.8"]], [])
    assert found == {"v4": ["127.0.0.8/32"], "v6": [], "unresolved": ["rpi-node-07.invalid"]}


def render(addresses: dict, ports: list[int]) -> str:
    # Jinja2 comes with Ansible (.venv); the other Pythons' nox sessions lack it,
    # and the template does not depend on the Python version.
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True)
    env.filters["comment"] = lambda text: "# " + text
    template = env.from_string((ROLE / "templates" / "rpicluster-firewall.nft.j2").read_text())
    return template.render(
        ansible_managed="Ansible managed",
        rpicluster_firewall_addresses=addresses,
        rpicluster_firewall_ports=ports,
    )


def test_the_table_replaces_only_itself_and_drops_only_the_masters_ports():
    text = render({"v4": ["10.0.0.2/32", "10.0.0.3/32"], "v6": []}, [5005, 9105])
    statements = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # Created (so that the delete cannot fail), deleted and made again in one file:
    # `nft -f` applies it as one transaction; no flush of anything else.
    assert statements[:3] == [
        "table inet rpicluster",
        "delete table inet rpicluster",
        "table inet rpicluster {",
    ]
    assert not any("flush" in s for s in statements)
    assert "elements = { 10.0.0.2/32, 10.0.0.3/32 }" in statements
    assert 'iifname "lo" accept' in statements
    assert "tcp dport { 5005, 9105 } ip saddr @pis_v4 accept" in statements
    drops = [s for s in statements if "drop" in s]
    assert drops == ['tcp dport { 5005, 9105 } counter drop comment "not a Pi of the inventory"']
    assert "policy accept;" in text  # every other port is left to the rest of the ruleset
    # No IPv6 Pi: the set stays empty (nft refuses `elements = { }`).
    v6 = text[text.index("set pis_v6") : text.index("chain input")]
    assert "elements" not in v6
