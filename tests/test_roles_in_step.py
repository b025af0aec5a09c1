"""The Ansible roles' defaults, argument specs and READMEs describe the same variables.

A variable added to ``defaults/main.yml`` but not to ``meta/argument_specs.yml``
is never validated, and one missing from the README is invisible to users.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[1] / "roles"
NAMES = ("rpicluster_common", "rpicluster_master", "rpicluster_slave")


def load(path: Path) -> dict:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


@pytest.mark.parametrize("role", NAMES)
def test_defaults_specs_and_readme_name_the_same_variables(role: str):
    defaults = load(ROLES / role / "defaults" / "main.yml")
    specs = load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    options = specs["main"]["options"]
    assert sorted(defaults) == sorted(options), f"{role}: defaults and argument_specs differ"
    assert all(name.startswith("rpicluster_") for name in defaults)
    readme = (ROLES / role / "README.md").read_text(encoding="utf-8")
    assert "## Role Variables" in readme
    assert [name for name in defaults if f"`{name}`" not in readme] == [], (
        f"{role}: README misses some"
    )


@pytest.mark.parametrize("role", NAMES)
def test_spec_defaults_equal_the_role_defaults(role: str):
    defaults = load(ROLES / role / "defaults" / "main.yml")
    specs = load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]
    for name, spec in specs["main"]["options"].items():
        if "default" in spec:
            assert spec["default"] == defaults[name], f"{role}: {name} default differs"
