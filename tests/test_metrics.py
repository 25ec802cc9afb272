"""Prometheus endpoints of a running miner and validator: scraped over HTTP, values move each window."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

from neurons.metrics import NodeMetrics
from neurons.miner import Miner
from neurons.validator import Validator


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
    assert last["crucible_bytes_uploaded"] > 0 and last["crucible_tokens_per_second"] > 0
    assert 0 < last["crucible_compute_fraction"] <= 1
    assert max(s.get("crucible_bytes_downloaded", 0) for s in seen["miner"]) > 0
    assert last["crucible_upload_seconds"] > 0 and max(s.get("crucible_download_seconds", 0) for s in seen["miner"]) > 0
    v = seen["validator"][-1]
    assert v["crucible_set_weights_ok"] == 1 and v["crucible_miners_evaluated"] >= 1
    assert any(k.startswith("crucible_uid_rating{") for k in v)
    assert len({s.get("crucible_window", -1) for s in seen["validator"]} - {0.0, -1}) >= 2
    await net.close()
