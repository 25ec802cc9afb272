"""The devnet's live web dashboard: the scoreboard and its history as one page in a browser.

The terminal scoreboard shows one window at a time; a browser can show how the run evolves. The
launcher owns a `Dashboard`: `await start()` serves, on loopback only, a self-contained page (`GET /`,
inline CSS and JS, plots drawn as inline SVG, no network access needed) and its data (`GET
/api/state`, JSON). The launcher calls `publish(snapshot)` each scored window, `publish_validators(seen)`
with several validators (per-validator vtrust and the spread of their weights, `chain_validators.py`),
`note(message)` for events and `set_status(text)` at the end; the page polls `/api/state?since=N` and redraws without
reloading. Everything is read-only: the page cannot change the run, and no keys ever reach it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections import deque
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from devnet.chain_validators import ValidatorWindow
from devnet.dashboard_page import PAGE
from devnet.scoreboard import WindowSnapshot

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Content-Security-Policy of the page: its own inline code and same-origin fetches, nothing else.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class DashboardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="Serve the dashboard; when off every call is a cheap no-op.")
    host: str = Field("127.0.0.1", description="Address to bind; must be a loopback address.")
    port: int = Field(0, ge=0, le=65535, description="TCP port to bind; 0 picks a free port.")
    poll_s: float = Field(1.0, gt=0, le=60, description="Seconds between the page's polls of /api/state.")
    max_notes: int = Field(200, ge=1, description="Most recent event lines kept for the page.")

    @field_validator("host")
    @classmethod
    def _loopback(cls, host: str) -> str:
        try:
            ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{host!r} is not a loopback address; the dashboard is for this machine only")
        return host


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _host_only(header: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:80' -> '::1', 'localhost' -> 'localhost'."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Dashboard:
    """The dashboard server and the state it shows; all methods run on the launcher's event loop."""

    def __init__(self, config: DashboardConfig | None = None, summary: dict[str, Any] | None = None):
        self.config = config or DashboardConfig()
        self.summary: dict[str, Any] = dict(summary or {})  # shown in the header; JSON-able values
        self.snapshots: list[dict[str, Any]] = []  # WindowSnapshot as JSON (non-finite floats -> null)
        self.notes: deque[dict[str, Any]] = deque(maxlen=self.config.max_notes)
        self.validators: list[dict[str, Any]] = []  # ValidatorWindow per scored window (several validators)
        self.status = "starting"
        self.version = 0  # bumped on every change, so the page can skip redraws
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    # --- what the launcher calls ----------------------------------------------------------------

    async def start(self) -> str | None:
        """Bind and serve; returns the page's URL, or None when disabled."""
        if not self.config.enabled:
            return None
        if self._runner is not None:
            return self.url
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/state", self._state)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"dashboard cannot listen on {self.config.host}:{self.config.port}: "
                                     f"{exc.strerror or exc}") from exc
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        self.url = f"http://{host}:{port}/"
        self.set_status("running")
        return self.url

    def publish(self, snapshot: WindowSnapshot) -> None:
        self.snapshots.append(json.loads(snapshot.model_dump_json()))
        self.version += 1

    def publish_validators(self, seen: ValidatorWindow) -> None:
        """Several validators: their trust, stake share and weight spread read from the chain after a window."""
        self.validators.append(_finite(seen.model_dump(exclude={"weights"})))
        self.version += 1

    def note(self, message: str) -> None:
        self.notes.append({"time": time.time(), "message": message})
        self.version += 1

    def set_status(self, text: str) -> None:
        """'running', or 'stopped: <reason>' at the end of the run."""
        self.status = text
        self.version += 1

    @property
    def addresses(self) -> list[tuple]:
        """The socket addresses the server listens on (empty when not serving)."""
        return list(self._runner.addresses) if self._runner is not None else []

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # --- HTTP ---------------------------------------------------------------------------------------

    def state(self, since: int = 0) -> dict[str, Any]:
        """What /api/state answers: snapshots from index `since` on, and everything else in full."""
        since = min(max(since, 0), len(self.snapshots))
        return {
            "config": _finite(self.summary),
            "status": self.status,
            "version": self.version,
            "poll_ms": round(self.config.poll_s * 1000),
            "count": len(self.snapshots),
            "since": since,
            "snapshots": self.snapshots[since:],
            "notes": list(self.notes),
            "validators": self.validators,
        }

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        # A page on another site could point its own name at 127.0.0.1 (DNS rebinding); refuse
        # any Host that is not a loopback name, and let no other origin frame or read us.
        if _host_only(request.host) not in LOOPBACK_NAMES:
            return web.Response(status=403, text="dashboard answers loopback host names only\n")
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": CSP})

    async def _state(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return web.json_response({"error": "since must be an integer"}, status=400)
        return web.json_response(self.state(since))
