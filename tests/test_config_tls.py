"""``[tls]`` in rpicluster.cfg: relative key and certificate paths are found beside the
config file (wherever the program was started from), absolute ones are kept, a config given
as text resolves them against the working directory, ``master_name`` is optional, and a
missing file setting is named with its section and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpicluster.config import ConfigError, load_config, parse_config
from rpicluster.tls import TlsSettings
from tests.conftest import TEST_SECRET
from tests.tlscerts import CA

SLAVE = f"[cluster]\nsecret = {TEST_SECRET}\n[slave]\nmaster_ip = 127.0.0.1\n"
RELATIVE = "[tls]\nca_file = tls/ca.crt\ncert_file = tls/pi-a.crt\nkey_file = tls/pi-a.key\n"


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """A config directory with the cluster CA and pi-a's credential under ``tls/``."""
    directory = tmp_path / "etc"
    CA(directory / "tls").issue("pi-a")
    return directory


def settings_in(directory: Path, master_name: str = "") -> TlsSettings:
    return TlsSettings(
        ca_file=str(directory / "tls" / "ca.crt"),
        cert_file=str(directory / "tls" / "pi-a.crt"),
        key_file=str(directory / "tls" / "pi-a.key"),
        master_name=master_name,
    )


def test_relative_paths_are_found_beside_the_config_file(etc, tmp_path, monkeypatch):
    path = etc / "rpicluster.cfg"
    path.write_text(SLAVE + RELATIVE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not where the files are
    assert load_config(str(path)).tls == settings_in(etc)
    # A config named relative to the working directory: its files too.
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/rpicluster.cfg").tls == settings_in(Path("etc"))


def test_absolute_paths_are_kept_as_written(etc, tmp_path, monkeypatch):
    absolute = settings_in(etc)
    path = tmp_path / "rpicluster.cfg"
    path.write_text(
        SLAVE
        + f"[tls]\nca_file = {absolute.ca_file}\ncert_file = {absolute.cert_file}\n"
        + f"key_file = {absolute.key_file}\n"
    )
    monkeypatch.chdir(etc)
    assert load_config(str(path)).tls == absolute


def test_a_config_given_as_text_resolves_against_the_working_directory(etc, monkeypatch):
    monkeypatch.chdir(etc)
    assert parse_config(SLAVE + RELATIVE).tls == settings_in(Path("."))
    assert parse_config(SLAVE + RELATIVE, "<cli>").tls == settings_in(Path("."))


def test_master_name_is_optional(etc, monkeypatch):
    monkeypatch.chdir(etc)
    assert parse_config(SLAVE + RELATIVE).tls.master_name == ""
    named = parse_config(SLAVE + RELATIVE + "master_name = rpi-master\n").tls
    assert named == settings_in(Path("."), master_name="rpi-master")


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_a_missing_file_setting_is_named(etc, monkeypatch, key):
    monkeypatch.chdir(etc)
    text = "".join(line + "\n" for line in RELATIVE.splitlines() if not line.startswith(key))
    with pytest.raises(ConfigError) as error:
        parse_config(SLAVE + text, "x.cfg")
    assert str(error.value) == f"x.cfg: [tls] {key}: is required but missing"
