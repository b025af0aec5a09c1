"""What the master tells about itself (views.py), over real sockets on 127.0.0.1: the TLS
object's days left recomputed at every call from the expiry read at start, and alerts
evaluated by the event loop on its own and shown in the master dict."""

from __future__ import annotations

import socket
import time

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
    shown = alerts()
    assert shown["firing_count"] == 1
    assert shown["webhook"]["enabled"] is False  # no webhook_url: shown, not sent
