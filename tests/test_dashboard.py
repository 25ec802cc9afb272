"""The devnet web dashboard: its JSON API over real HTTP, loopback-only binding, and the page itself
in a real headless Chromium (Selenium with Debian's chromium + chromium-driver, which are built from
one source package and so cannot drift apart), updating live without a reload.

The browser test skips when no browser is installed, and fails instead when CRUCIBLE_REQUIRE_BROWSER=1
(CI sets it). Its screenshot goes to $CRUCIBLE_ARTIFACTS when set, else to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from devnet.chain_validators import ValidatorWindow
from devnet.dashboard import Dashboard, DashboardConfig
from devnet.scoreboard import UidRow, WindowSnapshot

KINDS = {1: "honest", 2: "honest", 3: "honest", 4: "noise", 5: "copycat"}


def _snapshot(window: int, loss: float | None = None) -> WindowSnapshot:
    rows = []
    for uid, kind in KINDS.items():
        honest = kind == "honest"
        rows.append(UidRow(
            uid=uid, name=f"miner-{uid - 1}" if honest else f"adv-{kind}-0", kind=kind,
            status="ok" if honest else ("rejected" if kind == "noise" else "copy of uid 1"), accepted=honest,
            sync=1.0 if honest else 0.4, loss_score=0.01 * uid if honest else -0.02,
            rating=10.0 + uid + window if honest else -3.0, value=1.0 if honest else 0.0,
            memory=0.9 if honest else 0.0, why=f"uid {uid}  window {window}\n  raw score: max(0, value) × memory",
            weight=0.1 * uid + 0.01 * window if honest else 0.0, in_sync=(uid != 3) if honest else None,
            incentive=0.3 if honest else 0.05,
        ))
    held = 6.0 - 0.1 * window if loss is None else loss
    return WindowSnapshot(window=window, block=10 * window, time=1000.0 + window, heldout_loss=held,
                          model_window=window + 1, rows=rows)


VALIDATORS = {"validator-0": 0.6, "validator-1": 0.3, "validator-2": 0.1}


def _validators(window: int, gone: tuple[str, ...] = ()) -> ValidatorWindow:
    """What the launcher reads from the chain after a window with three validators (chain_validators.py)."""
    names = [n for n in VALIDATORS if n not in gone]
    total = sum(VALIDATORS[n] for n in names)
    return ValidatorWindow(
        window=window, block=10 * window + 3, vtrust={n: 1.0 - 0.02 * i - 0.001 * window for i, n in enumerate(names)},
        stake_share={n: VALIDATORS[n] / total for n in names}, permit={n: True for n in names},
        last_update={n: 10 * window for n in names},
        weights={n: {1: 0.5 + 0.01 * i, 2: 0.5 - 0.01 * i} for i, n in enumerate(names)},
        spread=0.04 if len(names) > 1 else None)


@pytest.fixture
async def dash():
    board = Dashboard(DashboardConfig(poll_s=0.2), summary={"preset": "tiny", "windows": 5, "miners": 3,
                                                            "adversaries": ["noise", "copycat"]})
    await board.start()
    yield board
    await board.stop()


async def _get(url: str, headers: dict | None = None) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.text()


# --- config and HTTP, no browser ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "::", "example.org", ""])
def test_config_refuses_non_loopback_hosts(host):
    with pytest.raises(ValidationError, match="loopback"):
        DashboardConfig(host=host)


def test_config_accepts_loopback_hosts():
    assert [DashboardConfig(host=h).host for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost")]
    with pytest.raises(ValidationError):
        DashboardConfig(port=70000)


async def test_api_state_serves_snapshots_notes_and_status(dash):
    for w in (3, 4, 5):
        dash.publish(_snapshot(w))
    dash.publish(_snapshot(6, loss=float("nan")))  # a non-finite number must not break the JSON
    dash.summary["initial_loss"] = float("inf")
    dash.note("miner-1 crashed (exit 1); restart 1/3")
    base = dash.url
    assert base.startswith("http://127.0.0.1:")

    status, headers, text = await _get(base + "api/state")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    state = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert state["status"] == "running" and state["count"] == 4 and state["since"] == 0
    assert [s["window"] for s in state["snapshots"]] == [3, 4, 5, 6]
    assert [r["uid"] for r in state["snapshots"][0]["rows"]] == [1, 2, 3, 4, 5]
    assert state["snapshots"][0]["rows"][3]["kind"] == "noise"
    assert state["snapshots"][3]["heldout_loss"] is None and state["snapshots"][2]["heldout_loss"] == 5.5
    assert state["config"]["preset"] == "tiny" and state["config"]["initial_loss"] is None
    assert state["notes"][-1]["message"].startswith("miner-1 crashed")
    assert state["poll_ms"] == 200

    _, _, text = await _get(base + "api/state?since=3")
    later = json.loads(text)
    assert later["since"] == 3 and [s["window"] for s in later["snapshots"]] == [6] and later["count"] == 4
    _, _, text = await _get(base + "api/state?since=99")  # more than the server holds: clamped
    assert json.loads(text)["since"] == 4
    assert (await _get(base + "api/state?since=x"))[0] == 400

    dash.set_status("stopped: 5 windows scored")
    _, _, text = await _get(base + "api/state")
    assert json.loads(text)["status"] == "stopped: 5 windows scored"


async def test_api_state_serves_validator_trust_and_weight_spread(dash):
    assert (json.loads((await _get(dash.url + "api/state"))[2]))["validators"] == []  # one validator: none
    dash.publish_validators(_validators(3))
    lone = _validators(4, gone=("validator-0", "validator-1"))
    lone.vtrust["validator-2"] = float("nan")  # non-finite must not break the JSON
    dash.publish_validators(lone)
    state = json.loads((await _get(dash.url + "api/state"))[2])
    first, second = state["validators"]
    assert first["window"] == 3 and first["vtrust"]["validator-1"] == pytest.approx(0.977)
    assert first["stake_share"]["validator-0"] == pytest.approx(0.6) and first["spread"] == pytest.approx(0.04)
    assert "weights" not in first  # the panel shows trust and spread; the rows stay on chain and in the report
    assert second["spread"] is None and second["vtrust"] == {"validator-2": None}


async def test_page_is_self_contained(dash):
    status, headers, html = await _get(dash.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for hook in ('id="loss-plot"', 'id="weight-plot"', 'id="incentive-plot"', 'id="rows"', "/api/state"):
        assert hook in html
    outside = html.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace name, never fetched
    assert "http://" not in outside and "https://" not in outside
    assert "<link" not in html and "src=" not in html  # nothing loaded from anywhere


def _outside_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


async def test_binds_loopback_only_and_refuses_foreign_host_names(dash):
    port = int(dash.url.rsplit(":", 1)[1].strip("/"))
    assert dash.addresses and all(addr[0] == "127.0.0.1" for addr in dash.addresses)
    outside = _outside_address()
    if outside is not None:
        with pytest.raises(OSError):
            await asyncio.open_connection(outside, port)
    status, _, _ = await _get(dash.url + "api/state", headers={"Host": f"evil.example:{port}"})
    assert status == 403  # DNS rebinding: another site's name pointing at 127.0.0.1
    assert (await _get(f"http://localhost:{port}/api/state"))[0] == 200


async def test_disabled_dashboard_serves_nothing_and_fixed_port_conflicts_are_errors(dash):
    off = Dashboard(DashboardConfig(enabled=False))
    assert await off.start() is None and off.url is None
    off.publish(_snapshot(1))
    off.note("x")
    await off.stop()
    port = int(dash.url.rsplit(":", 1)[1].strip("/"))
    clash = Dashboard(DashboardConfig(port=port))
    with pytest.raises(OSError, match="dashboard cannot listen on 127.0.0.1"):
        await clash.start()
    await clash.stop()


# --- the page in a real browser -----------------------------------------------------------------------------

CHROMIUM = os.environ.get("CRUCIBLE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (os.environ.get("CRUCIBLE_CHROMEDRIVER") or shutil.which("chromedriver")
                or "/usr/bin/chromedriver")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing()
    if reason is not None:
        if os.environ.get("CRUCIBLE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CRUCIBLE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(f"no headless browser: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1500", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager is never consulted, so nothing is ever downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


async def _js(driver, script: str):
    return await asyncio.to_thread(driver.execute_script, script)


async def _wait_for(driver, script: str, expected, what: str, limit_s: float = 30.0):
    """Poll `script` until it returns `expected`; fail naming `what` after `limit_s` (a bound, not a
    timing assertion: the browser and the server share this test's event loop's machine)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        value = await _js(driver, script)
        if value == expected:
            return value
        if loop.time() > deadline:
            pytest.fail(f"{what}: got {value!r}, waited for {expected!r}")
        await asyncio.sleep(0.1)


def _artifacts(tmp_path: Path) -> Path:
    where = os.environ.get("CRUCIBLE_ARTIFACTS")
    out = Path(where) if where else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def _count(selector: str) -> str:
    return f"return document.querySelectorAll({selector!r}).length"


async def test_page_in_headless_chromium_updates_live(dash, browser, tmp_path):
    for w in (10, 11, 12):
        dash.publish(_snapshot(w))
    dash.note("started 6 nodes")
    await asyncio.to_thread(browser.get, dash.url)
    await _wait_for(browser, "return document.body.dataset.count", "3", "snapshots shown after load")

    assert await _js(browser, _count("#rows tr")) == 5
    uids = await _js(browser, "return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.uid)")
    assert uids == ["1", "2", "3", "4", "5"]
    adversaries = await _js(browser, "return [...document.querySelectorAll('tr.adversary')]"
                                     ".map(r => r.dataset.kind)")
    assert adversaries == ["noise", "copycat"]
    badge = await _js(browser, "return document.querySelector('tr[data-uid=\"4\"] .badge').textContent")
    assert badge == "⚠ noise"
    why = await _js(browser, "return document.querySelector('tr[data-uid=\"2\"]').title")
    assert why.startswith("uid 2  window 12") and "max(0, value) × memory" in why  # the explain tooltip
    memory = await _js(browser, "return document.querySelector('tr[data-uid=\"2\"] td:nth-child(8)').textContent")
    assert memory == "0.90"
    in_sync = await _js(browser, "return [...document.querySelectorAll('#rows td:nth-child(10)')]"
                                 ".map(td => td.textContent + ':' + td.className)")
    assert in_sync == ["yes:", "yes:", "NO:st-bad", "-:", "-:"]  # uid 3 drifted; adversaries report nothing
    assert await _js(browser, _count("#loss-plot circle.loss-point")) == 3
    assert await _js(browser, "return document.getElementById('loss-plot').dataset.points") == "3"
    assert await _js(browser, _count("#weight-plot polyline.weight-line")) == 5
    assert await _js(browser, _count("#weight-plot circle.weight-point")) == 15
    assert await _js(browser, _count("#weight-legend [data-uid]")) == 5
    assert await _js(browser, _count("#incentive-plot rect.incentive-bar")) == 5
    assert await _js(browser, "return document.getElementById('window').textContent") == "12"
    assert await _js(browser, "return document.getElementById('status').textContent") == "running"
    assert "started 6 nodes" in await _js(browser, "return document.getElementById('notes').textContent")
    stamps = await _js(browser, "return [...document.querySelectorAll('#notes .t')].map(t => t.textContent)")
    assert stamps and all(re.fullmatch(r"[0-2]\d:[0-5]\d:[0-5]\d", t) for t in stamps)  # 24 h, as the terminal
    for plot in ("loss-plot", "weight-plot"):  # round tick labels, all inside the data's range
        labels = await _js(browser, f"return [...document.querySelectorAll('#{plot} text.y-tick')]"
                                    ".map(t => t.textContent)")
        assert len(labels) >= 3 and all(len(t.split(".")[-1]) <= 3 for t in labels), labels
    weight_ticks = await _js(browser, "return [...document.querySelectorAll('#weight-plot text.y-tick')]"
                                      ".map(t => Number(t.textContent))")
    assert max(weight_ticks) <= 1.0

    await _js(browser, "window.__marker = 1")  # survives only if the page is never reloaded
    later = _snapshot(14)
    later.rows[1].status, later.rows[1].accepted, later.rows[1].weight = "missing", False, None
    dash.publish(_snapshot(13))
    dash.publish(later)
    await _wait_for(browser, "return document.body.dataset.count", "5", "snapshots shown after two more")
    assert await _js(browser, _count("#loss-plot circle.loss-point")) == 5
    assert await _js(browser, _count("#weight-plot circle.weight-point")) == 24  # uid 2 has no point at 14
    assert await _js(browser, _count("#rows tr")) == 5
    assert await _js(browser, "return document.getElementById('window').textContent") == "14"
    shard = await _js(browser, "return document.querySelector('tr[data-uid=\"2\"] td:nth-child(4)')"
                               ".className")
    assert shard == "st-bad"
    assert await _js(browser, "return window.__marker") == 1

    dash.set_status("stopped: 5 windows scored")
    await _wait_for(browser, "return document.getElementById('status').textContent",
                    "stopped: 5 windows scored", "status after the run stops")
    shot = _artifacts(tmp_path) / "dashboard.png"
    assert await asyncio.to_thread(browser.save_screenshot, str(shot))
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"dashboard screenshot: {shot}")

    errors = [e for e in await asyncio.to_thread(browser.get_log, "browser") if e["level"] == "SEVERE"]
    assert errors == []  # no script error and no Content-Security-Policy violation

    await dash.stop()  # the page says so instead of freezing silently
    await _wait_for(browser, "return document.getElementById('conn').textContent.includes('not answering')",
                    True, "notice that the server is gone")


async def test_validator_panel_in_headless_chromium(dash, browser):
    for w in (5, 6, 7):
        dash.publish(_snapshot(w))
        dash.publish_validators(_validators(w))
    await asyncio.to_thread(browser.get, dash.url)
    await _wait_for(browser, _count("#vtrust-plot circle.vtrust-point"), 9, "vtrust points after load")
    await asyncio.to_thread(browser.get_log, "browser")  # drop what an earlier test's stopped page logged
    assert await _js(browser, _count("#vtrust-plot polyline.vtrust-line")) == 3
    assert await _js(browser, _count("#spread-plot circle.spread-point")) == 3
    rows = await _js(browser, "return [...document.querySelectorAll('#validator-rows tr')]"
                              ".map(r => [...r.cells].map(c => c.textContent))")
    assert rows == [["validator-0", "0.600", "yes", "0.993", "block 70"],
                    ["validator-1", "0.300", "yes", "0.973", "block 70"],
                    ["validator-2", "0.100", "yes", "0.953", "block 70"]]
    spread = await _js(browser, "return [...document.querySelectorAll('#spread-plot circle.spread-point')]"
                                ".map(c => Number(c.dataset.value))")
    assert spread == [0.04, 0.04, 0.04]
    vtrust_ticks = await _js(browser, "return [...document.querySelectorAll('#vtrust-plot text.y-tick')]"
                                      ".map(t => Number(t.textContent))")
    assert vtrust_ticks and max(vtrust_ticks) <= 1.0

    dash.publish(_snapshot(8))  # validator-0 killed: the next reads have two validators
    dash.publish_validators(_validators(8, gone=("validator-0",)))
    await _wait_for(browser, _count("#vtrust-plot circle.vtrust-point"), 11, "vtrust points after the kill")
    cells = await _js(browser, "return [...document.querySelectorAll('#validator-rows tr')]"
                               ".map(r => r.dataset.validator + ':' + r.cells[3].textContent)")
    assert cells == ["validator-0:-", "validator-1:0.992", "validator-2:0.972"]
    assert await _js(browser, _count("#spread-plot circle.spread-point")) == 4
    errors = [e for e in await asyncio.to_thread(browser.get_log, "browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_devnet_flags_reach_the_dashboard_and_notes_go_to_both(tmp_path):
    import argparse
    import io

    from rich.console import Console

    from devnet.launch_plan import DEVNET_FLAGS
    from devnet.launcher import Devnet, add_cli
    from devnet.scoreboard import Scoreboard

    parser = argparse.ArgumentParser()
    add_cli(parser)
    args = parser.parse_args(["--no-dashboard", "--dashboard-port", "8123", "--state", str(tmp_path)])
    cfg = DEVNET_FLAGS.parse(args)
    assert cfg.dashboard is False and cfg.dashboard_port == 8123
    assert DEVNET_FLAGS.parse(parser.parse_args([])).dashboard

    out = io.StringIO()
    devnet = Devnet(cfg, board=Scoreboard(console=Console(file=out, width=200), live=False))
    assert devnet.dash.config.enabled is False and devnet.dash.config.port == 8123
    assert devnet.dash.summary["windows"] == cfg.windows and devnet.dash.summary["preset"] == "tiny"
    devnet.note("miner-0 crashed (exit 1)")
    assert "miner-0 crashed" in out.getvalue()
    assert devnet.dash.notes[-1]["message"] == "miner-0 crashed (exit 1)"


TICKS_JS = """
{functions}
const out = {{}};
for (const [lo, hi] of [[7.571, 8.316], [0, 1], [0, 0.37], [1234.5, 1299.9], [6.001, 6.004]]) {{
  const t = ticks(lo, hi, 5, false);
  out[lo + "-" + hi] = t.values.map(v => v.toFixed(t.digits));
}}
out.windows = ticks(3, 41, 8, true).values;
out.clock = clock(Date.UTC(2026, 0, 1, 23, 5, 9) / 1000);  // TZ=UTC
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed (the browser test covers the page)")
def test_page_ticks_are_round_numbers_inside_the_range_and_the_clock_is_24_hours():
    """The page's tick and clock helpers, run in node: 1-2-2.5-5 steps, labels inside [lo, hi], whole windows."""
    from devnet.dashboard_page import PAGE

    start, end = PAGE.index("// 24-hour HH:MM:SS"), PAGE.index("function clear(node)")
    helpers = PAGE[start:end] + PAGE[PAGE.index('// "Nice" tick steps'):PAGE.index("// The plot area")]
    run = subprocess.run(["node", "-e", TICKS_JS.format(functions=helpers)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "TZ": "UTC"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["7.571-8.316"] == ["7.6", "7.8", "8.0", "8.2"]  # not 7.571 / 7.787 / ...
    assert out["0-1"] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert out["0-0.37"] == ["0.0", "0.1", "0.2", "0.3"]
    assert out["1234.5-1299.9"] == ["1240", "1260", "1280"] and out["6.001-6.004"][0] == "6.001"
    for key, labels in out.items():
        if "-" in key:
            lo, hi = map(float, key.split("-"))
            assert all(lo <= float(v) <= hi for v in labels), (key, labels)
    assert out["windows"] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert out["clock"] == "23:05:09"


async def test_dashboard_stays_up_after_the_run_until_enter_only_at_a_terminal(tmp_path, monkeypatch):
    """At a terminal the finished run keeps serving the page and says so; Enter closes it. Without a terminal
    (CI, tests, pipes) `linger` returns at once, so `crucible devnet run` always exits."""
    from devnet.launch_plan import DevnetConfig
    from devnet.launcher import Devnet

    devnet = Devnet(DevnetConfig(state=tmp_path, dashboard_port=0))
    await devnet.dash.start()
    try:
        with open(os.devnull) as null:  # not a terminal
            monkeypatch.setattr("sys.stdin", null)
            await asyncio.wait_for(devnet.linger(), 5)
        master, slave = os.openpty()
        with open(slave, closefd=True) as tty:
            monkeypatch.setattr("sys.stdin", tty)
            waiting = asyncio.create_task(devnet.linger())
            await asyncio.sleep(0.3)
            assert not waiting.done()  # still serving
            status, _, _ = await _get(devnet.dash.url + "api/state")
            assert status == 200
            assert "stays up at http://127.0.0.1:" in devnet.dash.notes[-1]["message"]
            assert "Enter or Ctrl-C" in devnet.dash.notes[-1]["message"]
            os.write(master, b"\n")
            await asyncio.wait_for(waiting, 5)
        os.close(master)
    finally:
        await devnet.dash.stop()
