"""The master's alert rules: when a Pi dies, overheats or browns out, someone hears of it.

The rules look at what the master already knows (node states, the latest
vitals, the store's health), so no Pi has to do anything new. Each alert is
keyed by ``(rule, node_id)``; it **fires once** when its condition has held for
``hold`` seconds and **resolves once** when it has been false for ``hold``
seconds, so a node that flaps between alive and dead every few seconds makes
one notification, not a storm. Pure logic with injected clocks: the tests drive
it without sleeping; the master calls :meth:`AlertEngine.evaluate` from its
event loop every :data:`EVALUATE_INTERVAL` seconds and hands the notifications
to the webhook (webhook.py), which never blocks the loop.

Bounded: at most one state per rule and node (the rules are fixed), and the
master dict shows at most :data:`SHOWN_FIRING` firing alerts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rpicluster import pihealth
from rpicluster.config import AlertSettings

log = logging.getLogger("rpicluster.master.alerts")

EVALUATE_INTERVAL = 1.0  # seconds between two evaluations of every rule
SHOWN_FIRING = 50  # firing alerts listed in the master dict at most (the count says the rest)
SCHEMA = "rpicluster.alert/1"  # the ``schema`` field of each notification (docs/alerts.md)

# Rule names (stable: the ``alert`` field of notifications) and their severity.
NODE_DEAD = "node_dead"
NODE_SUSPECT = "node_suspect"
TEMPERATURE_HIGH = "temperature_high"
UNDER_VOLTAGE = "under_voltage"
THROTTLED = "throttled"
DISK_LOW = "disk_low"
STORE_FAILING = "store_failing"
SEVERITY = {
    NODE_DEAD: "critical",
    NODE_SUSPECT: "warning",
    TEMPERATURE_HIGH: "warning",
    UNDER_VOLTAGE: "critical",
    THROTTLED: "warning",
    DISK_LOW: "warning",
    STORE_FAILING: "critical",
}
_VITALS_RULES = (TEMPERATURE_HIGH, UNDER_VOLTAGE, THROTTLED, DISK_LOW)
_THROTTLING = ("throttled", "frequency_capped", "soft_temperature_limit")


@dataclass
class _State:
    """One alert's life: pending (condition true, not yet held), firing, clearing."""

    name: str  # the node's name when the alert began ("" for the master's own)
    since: float  # monotonic time the condition became true
    started_at: float  # wall time of the same
    summary: str
    value: Optional[float]
    threshold: Optional[float]
    firing: bool = False
    notified: bool = False  # a firing notification was sent (so a resolved one is due)
    clear_since: Optional[float] = None  # monotonic time the condition became false


Condition = tuple[str, Optional[float], Optional[float]]  # summary, value, threshold
_NONE: dict[str, Condition] = {}  # no rule holds (shared: never modified)


class AlertEngine:
    """Evaluates the rules; :meth:`evaluate` returns the notifications to send."""

    def __init__(
        self,
        settings: AlertSettings,
        hostname: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.hostname = hostname
        self.clock = clock
        self.wall = wall
        self.states: dict[tuple[str, str], _State] = {}
        self.fired_total = 0
        self.resolved_total = 0
        self._first = True
        # node_id -> (name, rules that held at its latest change); nodes with none are absent.
        self._current: dict[str, tuple[str, dict[str, Condition]]] = {}
        self._frozen: set[str] = set()  # nodes neither alive nor suspect: vitals rules frozen

    # ----------------------------------------------------------------- rules

    def node_conditions(
        self, state: str, vitals: Any, who: Any, name_of: Callable[[Any], str] = str
    ) -> dict[str, Condition]:
        """The rules that hold for one node now (rule -> summary, value, threshold).

        ``name_of(who)`` names the node, called only when a rule holds.
        """
        if state == "alive" and self._healthy(vitals):
            return _NONE  # the usual case, kept cheap: 10,000 nodes are looked at every second
        name = name_of(who)
        s = self.settings
        found: dict[str, Condition] = {}
        if state == "dead" and s.dead:
            found[NODE_DEAD] = (f"node {name} is dead (silent or disconnected)", None, None)
        if state == "suspect" and s.suspect_for > 0:
            found[NODE_SUSPECT] = (
                f"node {name} is suspect (silent) for more than {s.suspect_for:g} s",
                None,
                s.suspect_for,
            )
        if state not in ("alive", "suspect") or not isinstance(vitals, dict):
            return found
        temp = _number(vitals.get("temperature"))
        if s.temperature > 0 and temp is not None and temp > s.temperature:
            found[TEMPERATURE_HIGH] = (
                f"node {name} SoC at {temp:.1f} C (above {s.temperature:g} C)",
                temp,
                s.temperature,
            )
        if s.power:
            now = {k: v.get("now") for k, v in pihealth.conditions(vitals).items()}
            if now.get("under_voltage"):
                found[UNDER_VOLTAGE] = (f"node {name} is under-voltage now", 1.0, None)
            held = [k.replace("_", " ") for k in _THROTTLING if now.get(k)]
            if held:
                found[THROTTLED] = (f"node {name}: {', '.join(held)} now", 1.0, None)
        free, total = _number(vitals.get("disk_free")), _number(vitals.get("disk_total"))
        if s.disk_free_percent > 0 and free is not None and total:
            percent = 100.0 * free / total
            if percent < s.disk_free_percent:
                found[DISK_LOW] = (
                    f"node {name} root disk {percent:.1f} % free (below {s.disk_free_percent:g} %)",
                    round(percent, 2),
                    s.disk_free_percent,
                )
        return found

    def _healthy(self, vitals: Any) -> bool:
        """True when no vitals rule can hold (a fast, conservative check)."""
        if not isinstance(vitals, dict):
            return True
        s = self.settings
        get = vitals.get
        temp = get("temperature")
        if s.temperature > 0 and type(temp) in (int, float) and temp > s.temperature:
            return False
        if s.power:
            word = get("throttled")
            if type(word) is int and word & 0xF:
                return False
            if get("under_voltage_alarm") == 1:
                return False
        if s.disk_free_percent > 0:
            free, total = get("disk_free"), get("disk_total")
            numbers = type(free) in (int, float) and type(total) in (int, float)
            if numbers and total and free * 100.0 < s.disk_free_percent * total:
                return False
        return True

    # ------------------------------------------------------------ evaluation

    def evaluate(
        self,
        changed: Iterable[tuple[str, Any, str, Any]],
        store: Optional[dict[str, Any]] = None,
        name_of: Callable[[Any], str] = str,
        gone: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        """Advance every alert; return the notifications (firing/resolved) now due.

        ``changed`` are the nodes whose state or vitals changed since the previous
        call (all of them the first time), as ``(node_id, who, state, vitals)``;
        ``name_of(who)`` names a node, asked only when a rule holds. The others
        keep the conditions found before, so a call costs the changes and the
        alerts, not the fleet. ``gone`` are forgotten nodes: their alerts resolve
        at once. ``store`` is the store's health object. A node's vitals rules are
        frozen while it is not alive or suspect (its last reading is stale:
        neither fire nor resolve on it).
        """
        now, wall = self.clock(), self.wall()
        first, self._first = self._first, False
        current, frozen = self._current, self._frozen
        for node_id, who, state, vitals in changed:
            found = self.node_conditions(state, vitals, who, name_of)
            if found:
                current[node_id] = (name_of(who), found)
            else:
                current.pop(node_id, None)
            if state in ("alive", "suspect"):
                frozen.discard(node_id)
            else:
                frozen.add(node_id)
        forgotten = set(gone)
        for node_id in forgotten:
            current.pop(node_id, None)
            frozen.discard(node_id)
        active: dict[tuple[str, str], tuple[str, Condition]] = {
            (rule, node_id): (name, condition)
            for node_id, (name, found) in current.items()
            for rule, condition in found.items()
        }
        if self.settings.store and isinstance(store, dict) and store.get("ok") is False:
            error = store.get("error") or "writes fail"
            active[(STORE_FAILING, "")] = ("", (f"the master's store fails: {error}", None, None))
        out: list[dict[str, Any]] = []
        hold = self.settings.hold
        for key, (name, (summary, value, threshold)) in active.items():
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = _State(name, now, wall, summary, value, threshold)
                if first and key[0] == NODE_DEAD:
                    # Dead before this master started: shown, but told only once, before.
                    state.firing = True
                    continue
            state.summary, state.value, state.clear_since = summary, value, None
            need = self.settings.suspect_for if key[0] == NODE_SUSPECT else hold
            if not state.firing and now - state.since >= need:
                state.firing = state.notified = True
                self.fired_total += 1
                out.append(self._notification("firing", key, state, None))
        for key in list(self.states):
            if key in active or (key[1] in frozen and key[0] in _VITALS_RULES):
                continue
            state = self.states[key]
            if not state.firing:
                del self.states[key]  # pending only: never told, nothing to resolve
                continue
            if state.clear_since is None:
                state.clear_since = now
            was_forgotten = key[1] in forgotten
            if was_forgotten or now - state.clear_since >= hold:
                del self.states[key]
                if state.notified:
                    self.resolved_total += 1
                    if was_forgotten:
                        state.summary += " (node forgotten)"
                    out.append(self._notification("resolved", key, state, wall))
        return out

    def _notification(
        self, status: str, key: tuple[str, str], state: _State, resolved_at: Optional[float]
    ) -> dict[str, Any]:
        """One notification, the JSON body of docs/alerts.md."""
        rule, node_id = key
        return {
            "schema": SCHEMA,
            "status": status,
            "alert": rule,
            "severity": SEVERITY[rule],
            "node_id": node_id or None,
            "name": state.name or None,
            "summary": state.summary,
            "value": state.value,
            "threshold": state.threshold,
            "started_at": round(state.started_at, 3),
            "resolved_at": None if resolved_at is None else round(resolved_at, 3),
            "master": self.hostname,
        }

    # ----------------------------------------------------------------- views

    @property
    def first(self) -> bool:
        """No evaluation yet: the next one must be given every node."""
        return self._first

    def firing(self) -> list[dict[str, Any]]:
        """The firing alerts, critical first, then oldest first."""
        rows = [
            self._notification("firing", key, state, None)
            for key, state in self.states.items()
            if state.firing
        ]
        rows.sort(key=lambda a: (a["severity"] != "critical", a["started_at"], a["alert"]))
        return rows

    def summary(self) -> dict[str, Any]:
        """The ``alerts`` object of the master dict (without the webhook's health)."""
        firing = self.firing()
        return {
            "firing": firing[:SHOWN_FIRING],
            "firing_count": len(firing),
            "fired_total": self.fired_total,
            "resolved_total": self.resolved_total,
        }


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
