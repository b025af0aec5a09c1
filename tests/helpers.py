"""Shared test helpers: await a condition instead of sleeping; run a call on the master's loop."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first, so a
    failing test says which condition never came true.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def on_loop(master: Any, fn: Callable[[], T]) -> T:
    """Run ``fn()`` on the master's event loop and return its result (or raise its error).

    The master's state belongs to its loop's thread; a test that reads or changes
    it from its own thread would race the loop.
    """
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc
        done.set()

    master.loop.call_soon_threadsafe(run)
    assert done.wait(10), "the event loop did not run the call"
    if "error" in box:
        raise box["error"]
    return box["value"]
