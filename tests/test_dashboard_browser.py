"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver).

``make pytest`` runs molecule/resources/browser.sh first, which installs both. The
test drives /usr/bin/chromedriver directly, so Selenium Manager never downloads
anything. It fails (never skips) when the browser is missing. Screenshots go to
artifacts/ (gitignored) for a human to look at.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.test_web_server import (
    DEAD_AFTER,
    REFRESH,
    ClusterRunner,
    SlaveProcesses,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1500,900",
)

pytestmark = pytest.mark.browser


@pytest.fixture
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the dashboard test needs Debian's chromium and "
            "chromium-driver; run `bash molecule/resources/browser.sh` (make pytest does)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture
def web_cluster(master, make_config, tmp_path):
    runner = ClusterRunner(make_config, tmp_path)
    yield runner.start(master)
    runner.stop()


@pytest.fixture
def processes(tmp_path, cluster_secret):
    running = SlaveProcesses(tmp_path, cluster_secret)
    yield running
    running.stop_all()


# Read the rendered page in one script call: the page reloads itself every second,
# so element handles kept across calls would go stale.
READ_ROWS = """
return Array.from(document.querySelectorAll('tr.node')).map(function (row) {
  return {
    id: row.dataset.nodeId,
    state: row.querySelector('.state').innerText,
    plots: Array.from(row.querySelectorAll('td.spark svg')).map(function (svg) {
      var box = svg.getBoundingClientRect();
      return {key: svg.parentElement.dataset.plot, width: box.width, height: box.height,
              lines: svg.querySelectorAll('polyline').length};
    })
  };
});
"""
READ_FIGURES = """
return Array.from(document.querySelectorAll('figure[data-plot] svg')).map(function (svg) {
  return svg.getBoundingClientRect().width;
});
"""


def read_rows(driver) -> dict[str, dict]:
    """node id -> {state, plots} as rendered in the browser."""
    from selenium.common.exceptions import WebDriverException

    try:
        return {row["id"]: row for row in driver.execute_script(READ_ROWS) or []}
    except WebDriverException:
        return {}  # caught mid-reload; read again


def states(driver) -> dict[str, str]:
    return {node_id: row["state"] for node_id, row in read_rows(driver).items()}


def test_dashboard_in_chromium_shows_every_node_with_plots(browser, web_cluster, processes):
    ARTIFACTS.mkdir(exist_ok=True)
    victim = processes.start(web_cluster.master.port, "vitals", "victim")
    expected = {s.node_id for s in web_cluster.slaves} | {web_cluster.web.node_id, victim.node_id}
    # Let a few seconds of history gather so the plots have lines, not dots.
    wait_for(
        lambda: len(web_cluster.web.state.snapshot.node_history(victim.node_id)) >= 40,
        what="40 history points of the victim",
    )
    browser.get(web_cluster.base + "/")
    assert browser.title.startswith("rpicluster:")
    seen = wait_for(
        lambda: (r := read_rows(browser)) and set(r) == expected and r,
        what="every node as a row in Chromium",
    )
    vitals_ids = {s.node_id for s in web_cluster.slaves} | {victim.node_id}
    for node_id, row in seen.items():
        assert row["state"] == "\u25cf alive", row
        assert len(row["plots"]) == 3, row
        for plot in row["plots"]:
            assert plot["width"] >= 100 and plot["height"] >= 30, row
            if node_id in vitals_ids and plot["key"] != "temp":
                # A drawn line, not just "no data" (this machine may have no thermal sensor).
                assert plot["lines"] >= 1, row
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    # The page refreshes itself: a marker set by us disappears with the reload.
    browser.execute_script("window.__marker = 1")
    wait_for(
        lambda: browser.execute_script("return window.__marker === undefined"),
        timeout=5,
        what="the page to reload itself",
    )

    # Kill a slave: the open page turns its row dead without any click.
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: states(browser).get(victim.node_id) == "\u2716 dead",
        timeout=15,
        what="the killed node dead in the browser",
    )
    elapsed = time.monotonic() - killed
    # dead_after + one state refresh + the page's 0.5 s poll, plus 3 s for a loaded
    # 2-core machine (selenium's own round trips included).
    assert elapsed <= DEAD_AFTER + REFRESH + 0.5 + 3.0, f"{elapsed:.2f} s"
    browser.save_screenshot(str(ARTIFACTS / "dashboard-dead-node.png"))

    # The node page: large plots and details.
    node_id = web_cluster.slaves[0].node_id
    browser.get(f"{web_cluster.base}/nodes/{node_id}")
    # The plots are drawn by the page's script after it loads: await them.
    widths = wait_for(
        lambda: (w := browser.execute_script(READ_FIGURES)) and len(w) == 5 and w,
        what="the node page's five plots",
    )
    assert all(w >= 400 for w in widths), widths
    assert node_id in browser.page_source
    browser.save_screenshot(str(ARTIFACTS / "node.png"))
    # No Content-Security-Policy violation or script error on any page we loaded.
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_dashboard_in_chromium_says_when_the_master_is_unreachable(browser, web_cluster):
    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(web_cluster.base + "/")
    wait_for(lambda: len(read_rows(browser)) == 4, what="the four nodes in Chromium")
    web_cluster.master.stop()
    banner = wait_for(
        lambda: browser.execute_script(
            "var b = document.getElementById('master-unreachable'); return b && b.innerText"
        ),
        timeout=10,
        what="the 'master unreachable' banner in Chromium",
    )
    assert banner.startswith("Master unreachable since") and "last known state" in banner
    assert len(read_rows(browser)) == 4  # the last known nodes stay on the page
    browser.save_screenshot(str(ARTIFACTS / "dashboard-master-unreachable.png"))
