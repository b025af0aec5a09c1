"""roles/rpicluster_common/files/probe.py: what deploy.yml skips on is reported exactly.

The roles skip a task when the probe's answer equals what the task would make,
so a wrong mode, owner or checksum here would leave a Pi unrepaired.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parents[1] / "roles" / "rpicluster_common" / "files" / "probe.py"


def probe(request: dict) -> dict:
    # as the role runs it: python3 -c <source> <request>
    done = subprocess.run(
        [sys.executable, "-c", PROBE.read_text(encoding="utf-8"), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_paths_dirs_and_contents(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    wheel = folder / "x-1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel bytes")
    os.chmod(wheel, 0o644)
    stamp = tmp_path / "stamp"
    stamp.write_text("abc  x.whl\n", encoding="utf-8")
    me = pwd.getpwuid(os.getuid()).pw_name
    my_group = grp.getgrgid(os.getgid()).gr_name

    answer = probe(
        {
            "paths": [str(folder), str(stamp), str(tmp_path / "missing")],
            "dirs": [str(folder), str(tmp_path / "no-dir")],
            "read": [str(stamp), str(tmp_path / "missing")],
        }
    )

    assert answer["paths"][str(folder)] == {
        "type": "directory",
        "owner": me,
        "group": my_group,
        "mode": "0750",
    }
    assert answer["paths"][str(tmp_path / "missing")] is None
    assert answer["paths"][str(stamp)]["sha1"] == hashlib.sha1(b"abc  x.whl\n").hexdigest()
    listed = answer["dirs"][str(folder)]
    assert list(listed) == [wheel.name]
    assert listed[wheel.name]["sha256"] == hashlib.sha256(b"wheel bytes").hexdigest()
    assert listed[wheel.name]["mode"] == "0644"
    assert answer["dirs"][str(tmp_path / "no-dir")] is None
    assert answer["contents"] == {str(stamp): "abc  x.whl\n", str(tmp_path / "missing"): None}


def test_accounts():
    me = pwd.getpwuid(os.getuid())
    answer = probe({"user": me.pw_name, "group": grp.getgrgid(me.pw_gid).gr_name})
    assert answer["user"]["home"] == me.pw_dir and answer["user"]["gid"] == me.pw_gid
    assert answer["group"] == {"gid": me.pw_gid}
    missing = probe({"user": "no-such-user-rpicluster", "group": "no-such-group-rpicluster"})
    assert missing["user"] is None and missing["group"] is None


def test_packages_and_units_answer_even_without_dpkg_or_systemd():
    # On a Pi these come from dpkg-query and systemctl; wherever they are
    # missing or know nothing, the answer is empty (so every task runs), never an error.
    answer = probe({"packages": ["no-such-package-rpicluster"], "units": ["no-such.service"]})
    assert answer["packages"].get("no-such-package-rpicluster") in (None, "not-installed")
    assert isinstance(answer["units"], dict)
