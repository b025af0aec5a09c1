"""Everything deploy.yml needs to know about one Pi, in one round trip.

Why: an unchanged re-run of deploy.yml used to cost some twenty SSH round trips
per Pi (stat, slurp, dpkg-query, each file and directory module) that all found
everything in place. This script, run once per Pi by tasks/probe.yml with the
Pi's own python3, reports the state those tasks would check; each task then runs
only where the state differs from what it would make, and does its usual work
there. It only reads.

Argument: one JSON object {"paths": [...], "dirs": [...], "packages": [...],
"user": str, "group": str, "units": [...], "read": [...]}. Output: one JSON
object (see main()). Python 3.7+, standard library only.
"""

import grp
import hashlib
import json
import os
import pwd
import stat
import subprocess
import sys

MAX_HASHED = 64 * 1024 * 1024


def owner_names(st):
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return owner, group


def describe(path):
    """Type, owner, group, mode and (regular files) sha1 and sha256 of one path, or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    owner, group = owner_names(st)
    info = {"owner": owner, "group": group, "mode": f"{stat.S_IMODE(st.st_mode):04o}"}
    if stat.S_ISDIR(st.st_mode):
        info["type"] = "directory"
    elif stat.S_ISREG(st.st_mode):
        info["type"] = "file"
        if st.st_size <= MAX_HASHED:
            sha1, sha256 = hashlib.sha1(), hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        sha1.update(block)
                        sha256.update(block)
            except OSError:
                return info
            info["sha1"], info["sha256"] = sha1.hexdigest(), sha256.hexdigest()
    else:
        info["type"] = "other"
    return info


def packages(names):
    """Package -> dpkg status word ("installed", ...); absent when dpkg does not know it."""
    if not names:
        return {}
    try:
        done = subprocess.run(
            ["dpkg-query", "--show", "--showformat", "${Package} ${db:Status-Status}\\n"]
            + list(names),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            check=False,
        )
    except OSError:
        return {}
    found = {}
    for line in done.stdout.splitlines():
        name, _, status = line.partition(" ")
        if name:
            found[name.split(":")[0]] = status.strip()
    return found


def units(names):
    """Unit -> {ActiveState, UnitFileState, LoadState} from one `systemctl show`."""
    if not names:
        return {}
    try:
        done = subprocess.run(
            ["systemctl", "show", "--property=Id,ActiveState,UnitFileState,LoadState"]
            + list(names),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            check=False,
        )
    except OSError:
        return {}
    result = {}
    for name, block in zip(names, done.stdout.strip().split("\n\n")):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        result[name] = props
    return result


def account(kind, name):
    try:
        if kind == "user":
            entry = pwd.getpwnam(name)
            return {
                "uid": entry.pw_uid,
                "gid": entry.pw_gid,
                "home": entry.pw_dir,
                "shell": entry.pw_shell,
                "comment": entry.pw_gecos,
            }
        entry = grp.getgrnam(name)
        return {"gid": entry.gr_gid}
    except KeyError:
        return None


def main():
    request = json.loads(sys.argv[1])
    paths = {path: describe(path) for path in request.get("paths", [])}
    listings = {}
    for directory in request.get("dirs", []):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            names = None
        listings[directory] = (
            None if names is None else {n: describe(os.path.join(directory, n)) for n in names}
        )
    contents = {}
    for path in request.get("read", []):
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                contents[path] = handle.read()
        except OSError:
            contents[path] = None
    json.dump(
        {
            "paths": paths,
            "dirs": listings,
            "contents": contents,
            "packages": packages(request.get("packages", [])),
            "user": account("user", request.get("user", "")),
            "group": account("group", request.get("group", "")),
            "units": units(request.get("units", [])),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
