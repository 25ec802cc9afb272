"""Prometheus endpoints of a running miner and validator: scraped over HTTP, values move each window; every name
passes the Prometheus naming lint (promtool's when installed, and the same rules in Python always); the Grafana
dashboard in deploy/ reads exactly the exported names."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gauntlet.state import ScoringState, UidState
from neurons.metrics import NodeMetrics
from neurons.miner import Miner
from neurons.validator import Validator

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "crucible-node.json"
SNAKE = re.compile(r"[a-z_][a-z0-9_]*")
UNITS = ("seconds", "bytes", "ratio", "info")  # base units (and the info suffix) a name ends with when it has one
NOT_BASE_UNITS = ("milliseconds", "microseconds", "nanoseconds", "minutes", "hours", "days", "kilobytes",
                  "megabytes", "gigabytes", "percent", "fraction")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def test_metrics_move_across_windows(network_factory, tmp_path):
    net = network_factory(miners=2, validators=1)
    validator = Validator(await net.node("validator-0"), tmp_path / "v")
    miners = [Miner(await net.node(f"miner-{i}"), tmp_path / f"m{i}") for i in range(2)]
    ports = {"validator": _port(), "miner": _port()}
    validator.metrics, miners[0].metrics = NodeMetrics("validator"), NodeMetrics("miner")
    validator.metrics.serve(ports["validator"])
    miners[0].metrics.serve(ports["miner"])

    seen: dict[str, list[dict[str, float]]] = {"validator": [], "miner": []}

    async def scrape_until(done: asyncio.Event) -> None:
        while not done.is_set():
            for role, port in ports.items():
                seen[role].append(await asyncio.to_thread(_scrape, port))
            await asyncio.sleep(0.5)

    done = asyncio.Event()
    scraper = asyncio.create_task(scrape_until(done))
    await asyncio.gather(validator.run(windows=3), *[m.run(windows=3) for m in miners])
    done.set()
    await scraper
    for role in ports:
        seen[role].append(_scrape(ports[role]))

    miner_windows = {s.get("crucible_window", -1) for s in seen["miner"]}
    assert len(miner_windows - {0.0, -1}) >= 2, miner_windows
    last = seen["miner"][-1]
    assert last["crucible_bucket_upload_bytes_total"] > 0 and last["crucible_train_tokens_per_second"] > 0
    assert 0 < last["crucible_compute_ratio"] <= 1 and last["crucible_windows_completed_total"] >= 2
    assert max(s.get("crucible_bucket_download_bytes_total", 0) for s in seen["miner"]) > 0
    assert last["crucible_bucket_upload_seconds_total"] > 0
    assert max(s.get("crucible_bucket_download_seconds_total", 0) for s in seen["miner"]) > 0
    totals = [s.get("crucible_bucket_upload_bytes_total", 0) for s in seen["miner"]]
    assert totals == sorted(totals)  # a counter never goes down
    assert last["process_resident_memory_bytes"] > 0 and last["process_cpu_seconds_total"] > 0
    v = seen["validator"][-1]
    assert v["crucible_set_weights_ok"] == 1 and v["crucible_miners_evaluated"] >= 1
    assert any(k.startswith("crucible_uid_rating{") for k in v)
    assert len({s.get("crucible_window", -1) for s in seen["validator"]} - {0.0, -1}) >= 2
    await net.close()


def exposition(role: str) -> str:
    """A node's /metrics page after one observed window (so labelled series exist too)."""
    metrics = NodeMetrics(role)
    bucket = SimpleNamespace(stats=SimpleNamespace(bytes_uploaded=10, bytes_downloaded=20, upload_seconds=0.5,
                                                   download_seconds=0.25, retries=1, by_operation={"put": 2}))
    if role == "miner":
        report = SimpleNamespace(window=3, window_s=10.0, train_loss=7.5, tokens_per_s=100.0, tokens=1000, compute_s=5.0,
                                 compute_fraction=0.5, uploaded=True, shard_bytes=4096, peers_used=["a"],
                                 skipped={"b": "late"})
        metrics.observe_miner(report, [bucket])
    else:
        report = SimpleNamespace(window=3, seconds=9.0, weights_set=False, evaluated=2, eval_seconds=4.0, weights={1: 1.0})
        metrics.observe_validator(report, ScoringState(uids={1: UidState(hotkey="h", mu=25.0, sigma=8.0)}), [bucket])
    return generate_latest(metrics.registry).decode()


def exported_names(text: str, family) -> set[str]:
    """The series names a family puts on the page: its samples', or for a labelled family with no series yet,
    the name its TYPE line declares (the parser strips a counter's _total from the family name)."""
    if family.samples:
        return {sample.name for sample in family.samples}
    declared = re.findall(rf"^# TYPE ({family.name}(?:_total)?) ", text, re.MULTILINE)
    return set(declared) or {family.name}


def naming_problems(text: str) -> list[str]:
    """promtool's `check metrics` lint and the Prometheus naming conventions it leaves to reviewers."""
    problems = []
    for family in text_string_to_metric_families(text):
        name, kind = family.name, family.type
        exported = exported_names(text, family)
        if not SNAKE.fullmatch(name) or not name.startswith(("crucible_", "process_", "python_")):
            problems.append(f"{name}: not snake_case with a crucible_/process_/python_ prefix")
        if not family.documentation:
            problems.append(f"{name}: no help text")
        if kind == "counter" and not all(n.endswith("_total") for n in exported):
            problems.append(f"{name}: counter without _total")
        if kind != "counter" and any(n.endswith(("_total", "_count", "_sum", "_bucket")) for n in exported):
            problems.append(f"{name}: a {kind} with a counter/histogram suffix")
        stem = name.removesuffix("_total")
        for unit in UNITS:
            if unit in stem.split("_") and not stem.endswith(unit) and not stem.endswith("_per_second"):
                problems.append(f"{name}: unit {unit} not at the end")
        for bad in NOT_BASE_UNITS:
            if bad in stem.split("_"):
                problems.append(f"{name}: {bad} is not a base unit")
        for sample in family.samples:
            for label in sample.labels:
                if not SNAKE.fullmatch(label) or label.startswith("__"):
                    problems.append(f"{name}: label {label!r}")
    return problems


@pytest.mark.parametrize("role", ["miner", "validator"])
def test_metric_names_pass_the_prometheus_naming_lint(role):
    text = exposition(role)
    assert naming_problems(text) == []
    assert naming_problems("# HELP crucible_bytes_uploaded x\n# TYPE crucible_bytes_uploaded gauge\n"
                           "crucible_bytes_uploaded 1\n") == ["crucible_bytes_uploaded: unit bytes not at the end"]
    promtool = shutil.which("promtool")  # Debian's `prometheus` package; CI without it still runs the rules above
    if promtool:
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def test_grafana_dashboard_reads_exactly_the_exported_metrics():
    exported: set[str] = set()
    for role in ("miner", "validator"):
        text = exposition(role)
        for family in text_string_to_metric_families(text):
            exported |= exported_names(text, family)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {m for e in exprs for m in re.findall(r"\b(?:crucible|process|python)_[a-z0-9_]+", e)}
    assert used and used <= exported, sorted(used - exported)
    ours = {name for name in exported if name.startswith("crucible_")}
    assert ours <= used, f"exported but on no panel: {sorted(ours - used)}"
