"""What the master tells about itself (views.py), over real sockets on 127.0.0.1: the TLS
object's days left recomputed at every call from the expiry read at start, alerts evaluated
by the event loop on its own and shown in the master dict with the webhook's target (never
its path), and the summary lines of the master's rate-limited logs, each naming what it
counts."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from rpicluster import protocol as p
from rpicluster.tls import days_left
from tests.helpers import wait_for

QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}
DAY = 86400.0


def test_the_tls_object_counts_days_left_at_each_call_and_keeps_the_status(master_factory):
    master = master_factory(cluster=QUIET)
    assert master.cluster_state()["master"]["tls"] == {"enabled": False}
    now = time.time()
    status = {
        "enabled": True,
        "name": "m1",
        "not_after": now + 10 * DAY,
        "ca_not_after": now + 400 * DAY,
    }
    master.tls_status = dict(status)
    view = master.cluster_state()["master"]["tls"]
    assert view == {
        **status,
        "days_left": days_left(status["not_after"]),  # 10.0 for the next 0.05 days
        "ca_days_left": days_left(status["ca_not_after"]),
    }
    assert master.tls_status == status  # the view is a copy: the status read at start stays
    # Time passes for the certificate (its expiry comes closer): the next view says so.
    master.tls_status = {**status, "not_after": now + 2 * DAY, "ca_not_after": now + 1 * DAY}
    later = master.cluster_state()["master"]["tls"]
    assert later["days_left"] < view["days_left"] and later["ca_days_left"] < view["ca_days_left"]
    assert round(later["days_left"]) == 2 and round(later["ca_days_left"]) == 1


def test_alerts_are_evaluated_by_the_loop_and_shown_in_the_master_dict(
    master_factory, cluster_secret
):
    master = master_factory(cluster=QUIET, alerts={"hold": 0})
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    p.client_handshake(sock, cluster_secret, kind="slave", node_id="n1", role="basic")
    sock.close()  # without goodbye: dead at once

    def alerts():
        return master.cluster_state()["master"]["alerts"]

    firing = wait_for(lambda: alerts()["firing"], what="the dead node's alert to fire")
    assert [alert["node_id"] for alert in firing] == ["n1"]
    assert firing[0]["master"] == socket.gethostname()  # which master says so
    shown = alerts()
    assert shown["firing_count"] == 1
    assert shown["webhook"]["enabled"] is False  # no webhook_url: shown, not sent


def test_the_webhook_is_shown_without_its_secret_path(master_factory):
    url = "http://127.0.0.1:9/hooks/secret-token?key=also-secret"
    master = master_factory(
        cluster=QUIET, alerts={"webhook_url": url, "webhook_format": "chat", "webhook_timeout": 2}
    )
    webhook = master.cluster_state()["master"]["alerts"]["webhook"]
    assert webhook["enabled"] is True and webhook["ok"] is True, webhook
    assert webhook["target"] == "http://127.0.0.1:9" and webhook["format"] == "chat"
    assert "secret" not in json.dumps(webhook)


@pytest.mark.parametrize(
    ("limiter", "what", "level"),
    [
        ("log_joins", "joins", logging.INFO),
        ("log_leaves", "disconnections", logging.INFO),
        ("log_deaths", "silent nodes marked dead", logging.WARNING),
        ("log_refusals", "refused connections", logging.INFO),
        ("log_members", "refused member messages", logging.INFO),
        ("log_loop", "event loop errors", logging.INFO),
        ("log_alerts", "alert notifications", logging.INFO),
    ],
)
def test_each_summary_of_suppressed_lines_names_what_it_counts(
    master_factory, caplog, limiter, what, level
):
    """21 lines in one window: 20 logged, then one summary line once the window is over."""
    caplog.set_level(logging.INFO, logger="rpicluster")
    master = master_factory(cluster=QUIET)
    log = getattr(master, limiter)
    start = log.start + log.window  # a window of its own, after any the master opened

    def flood() -> None:
        for i in range(log.limit + 1):
            log(start, logging.INFO, "line %d of the test", i)
        log.flush(start + log.window)

    master.loop.call_soon_threadsafe(flood)
    summary = f"1 more {what} in the last 10 s (not logged one by one)"
    wait_for(lambda: summary in [r.getMessage() for r in caplog.records], what=summary)
    (record,) = [r for r in caplog.records if r.getMessage() == summary]
    assert record.levelno == level
    assert len([r for r in caplog.records if "of the test" in r.getMessage()]) == log.limit


def test_cluster_state_is_built_on_the_loop_from_any_thread(master_factory):
    """The registry belongs to the loop's thread: another thread's call is run there."""
    master = master_factory(cluster=QUIET)
    built_on = []
    master_dict = master.master_dict

    def recording(full: bool = True) -> dict:
        built_on.append(threading.current_thread())
        return master_dict(full)

    master.master_dict = recording
    loop_thread = master._thread
    assert master.cluster_state()["total"] == 0
    assert built_on == [loop_thread]
    master.stop()
    assert master.cluster_state()["total"] == 0  # the loop has ended: built here
    assert built_on == [loop_thread, threading.current_thread()]
