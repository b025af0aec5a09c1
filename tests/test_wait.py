"""``rpicluster wait``: exit 0 when every named node reached the state, 1 on timeout
(one line per missing node with its state), 2 on a usage or config error.

The judging rules are tested on node objects with a fake clock (no sleeping); the
command itself runs in-process against a real master on loopback with real slave
threads, which all share this machine's hostname, as cards left at
``raspberrypi`` do: only their node names tell them apart.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from rpicluster import cli, waiting
from rpicluster.slave import RpiBasicSlaveThread


def node(node_id: str, name: str, state: str = "alive", connected: bool = True) -> dict:
    return {
        "node_id": node_id,
        "name": name,
        "hostname": "raspberrypi",
        "state": state,
        "connected": connected,
        "last_seen": 1000.0,
    }


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def run_wait(fetch, wanted, state="alive", timeout=5.0):
    fake = FakeTime()
    result = waiting.wait(
        fetch, wanted, state, timeout, clock=fake.clock, sleep=fake.sleep, wall=lambda: 1010.0
    )
    return result, fake


# ----------------------------------------------------------------- the rules


def test_alive_is_reached_by_name_or_node_id_never_by_hostname():
    nodes = [node("id-1", "pi-1"), node("id-2", "pi-2")]
    (ok, verdicts, error), fake = run_wait(lambda: nodes, ["pi-1", "id-2"])
    assert ok and error is None and fake.sleeps == []
    assert [v.reached for v in verdicts] == [True, True]
    (ok, verdicts, _), _ = run_wait(lambda: nodes, ["raspberrypi"], timeout=1)
    assert not ok
    assert verdicts[0].line == "raspberrypi: unknown (no node of that name or id)"


def test_timeout_names_each_missing_node_with_its_state():
    nodes = [
        node("id-1", "pi-1"),
        node("id-2", "pi-2", "dead", connected=False),
        node("id-3", "pi-3", "alive", connected=False),  # loaded after a master restart
    ]
    (ok, verdicts, _), fake = run_wait(lambda: nodes, ["pi-1", "pi-2", "pi-3", "pi-4"], timeout=2)
    assert not ok
    assert sum(fake.sleeps) == pytest.approx(2.0)  # bounded by the timeout, polled each 0.5 s
    assert len(fake.sleeps) == 4
    missing = [v.line for v in verdicts if not v.reached]
    assert missing == [
        "pi-2: dead (node id-2, last seen 10 s ago)",
        "pi-3: alive (offline) (node id-3, last seen 10 s ago)",
        "pi-4: unknown (no node of that name or id)",
    ]


def test_a_reflashed_pi_is_alive_when_its_new_node_id_is():
    nodes = [node("old", "pi-5", "dead", connected=False), node("new", "pi-5")]
    (ok, verdicts, _), _ = run_wait(lambda: nodes, ["pi-5"])
    assert ok
    assert "[2 nodes share this name]" in verdicts[0].line


def test_left_and_gone():
    nodes = [node("id-1", "pi-1", "left", False), node("id-2", "pi-2", "dead", False)]
    (ok, _, _), _ = run_wait(lambda: nodes, ["pi-1"], "left")
    assert ok
    (ok, verdicts, _), _ = run_wait(lambda: nodes, ["pi-1", "pi-2"], "left", timeout=1)
    assert not ok and [v.reached for v in verdicts] == [True, False]
    (ok, verdicts, _), _ = run_wait(lambda: nodes, ["pi-1", "pi-2", "pi-9"], "gone")
    assert ok and verdicts[2].line == "pi-9: gone (not known to the master)"
    nodes.append(node("id-3", "pi-3", "suspect"))
    (ok, verdicts, _), _ = run_wait(lambda: nodes, ["pi-3"], "gone", timeout=1)
    assert not ok and verdicts[0].line.startswith("pi-3: suspect")


def test_the_wait_goes_on_through_master_errors_until_it_answers():
    answers = iter([OSError("refused"), OSError("refused"), [node("id-1", "pi-1")]])

    def fetch():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    (ok, _, error), fake = run_wait(fetch, ["pi-1"])
    assert ok and error is None and len(fake.sleeps) == 2


def test_a_master_that_never_answers_times_out_with_its_error():
    def fetch():
        raise ConnectionRefusedError("connection refused")

    (ok, verdicts, error), _ = run_wait(fetch, ["pi-1"], timeout=1)
    assert not ok and error == "connection refused"
    assert verdicts[0].line == "pi-1: unknown (master not reached)"


@pytest.mark.parametrize(
    ("value", "problem"),
    [(" , ", "names no node"), ("pi-1,bad\nname", "control"), ("x" * 257, "1..256")],
)
def test_bad_node_lists(value, problem):
    with pytest.raises(ValueError, match=problem):
        waiting.parse_nodes(value)


def test_node_lists_keep_order_and_drop_repeats():
    assert waiting.parse_nodes(" pi-2, pi-1 ,pi-2,") == ["pi-2", "pi-1"]


# --------------------------------------------------- the command, real master


def config_file(tmp_path: Path, secret: str, port: int) -> str:
    cfg = tmp_path / "client.cfg"
    cfg.write_text(
        f"[cluster]\nsecret = {secret}\n\n[slave]\nmaster_ip = 127.0.0.1\nsocket_port = {port}\n",
        encoding="utf-8",
    )
    return str(cfg)


@pytest.fixture
def fleet(master):
    """Three slaves named pi-1..pi-3 on one machine (one OS hostname)."""
    threads = [
        RpiBasicSlaveThread(
            "127.0.0.1",
            master.port,
            secret=master.config.cluster.secret,
            node_id=f"node-{i}",
            node_name=f"pi-{i}",
            heartbeat_interval=0.1,
            dead_after=0.6,
            reconnect_base=0.05,
            reconnect_cap=0.2,
        )
        for i in (1, 2, 3)
    ]
    for thread in threads:
        thread.start()
    yield threads
    for thread in threads:
        thread.stop()
    for thread in threads:
        thread.join(5)


def test_wait_command_exit_codes_over_a_real_master(master, fleet, tmp_path, capsys):
    cfg = config_file(tmp_path, master.config.cluster.secret, master.port)
    assert (
        cli.main(["wait", "--config", cfg, "--nodes", "pi-1,pi-2,node-3", "--timeout", "10"]) == 0
    )
    assert capsys.readouterr().out == "3 node(s) alive: pi-1, pi-2, node-3\n"
    assert {n["hostname"] for n in master.cluster_state()["nodes"]} == {socket.gethostname()}
    fleet[1].stop()  # pi-2's service stops
    fleet[1].join(5)
    started = time.monotonic()
    code = cli.main(["wait", "--config", cfg, "--nodes", "pi-1,pi-2,pi-3", "--timeout", "0.6"])
    assert code == 1
    assert time.monotonic() - started < 5  # bounded by --timeout, not by the slaves
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "rpicluster wait: 1 of 3 node(s) not alive after 0.6 s:"
    assert len(out) == 2 and out[1].startswith("pi-2: left (node node-2, last seen ")
    assert cli.main(["wait", "--config", cfg, "--nodes", "pi-2", "--state", "left"]) == 0
    assert cli.main(["wait", "--config", cfg, "--nodes", "pi-2,pi-9", "--state", "gone"]) == 0
    code = cli.main(
        ["wait", "--config", cfg, "--nodes", "pi-1", "--state", "gone", "--timeout", "0.3"]
    )
    assert code == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("pi-1: alive (node node-1")


def test_wait_command_usage_and_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["wait", "--nodes", ",", "--config", str(tmp_path / "x.cfg")])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["wait", "--nodes", "pi-1", "--state", "sleeping"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["wait", "--nodes", "pi-1", "--timeout", "-1"])
    assert caught.value.code == 2
    assert cli.main(["wait", "--nodes", "pi-1", "--config", str(tmp_path / "missing.cfg")]) == 2
    assert "config error" in capsys.readouterr().err


def test_wait_command_with_the_master_down_times_out_with_exit_1(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = config_file(tmp_path, "some-secret-0123456789", port)
    assert cli.main(["wait", "--config", cfg, "--nodes", "pi-1", "--timeout", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "pi-1: unknown (master not reached)" in captured.out
    assert "the master did not answer" in captured.err


def test_wait_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "rpicluster wait --nodes" in readme
    assert "Exit status: 0 every node reached the state, 1 timeout" in readme
    assert "and 2 for a usage or config error" in readme
