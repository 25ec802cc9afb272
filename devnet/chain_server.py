"""The devnet chain process: an aiohttp server that produces blocks and executes signed extrinsics.

One process owns one `ChainState` (see `chain_state.py`). It produces a block every `block_time`
seconds, includes the extrinsics signed and submitted since the last block (signature, genesis,
era and nonce checked at submission, like a node's transaction pool), runs each subnet's epoch
when its tempo is due, and saves the state atomically (`chain_store.py`) so a restart continues
from the same block. Clients reach it only through `devnet.substrate.DevnetSubstrate`, the SDK's
`Substrate` seam, via JSON POSTs to `/rpc`. It binds 127.0.0.1 only.

    crucible devnet chain --state DIR [--port P] [--block-time 1.0] [--drand-pulses FILE] [--drand-url URL]
    → {"event": "chain_started", "url": "devnet://127.0.0.1:P", "block": …}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from bittensor._generated.errors import ERRORS
from bittensor.keyfiles import Keypair
from pydantic import BaseModel, ConfigDict, Field

from devnet import chain_views as views
from devnet.chain_commit_reveal import feed_pulses
from devnet.chain_epoch import produce_block
from devnet.chain_pulses import pulse_source
from devnet.chain_state import ChainState, DispatchError, dispatch, validate_call
from devnet.chain_store import ChainStoreError, load_state, save_state
from devnet.chain_wire import DevnetCall, block_hash, block_number_of, extrinsic_hash, hex_bytes

HOST = "127.0.0.1"
_ERROR_INDEX = {(info.pallet, info.name): key for key, info in ERRORS.items()}


class ChainServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state_dir: Path = Field(description="Folder holding chain_state.json (written by `crucible devnet init`).")
    port: int = Field(0, ge=0, le=65535, description="TCP port on 127.0.0.1; 0 picks a free one.")
    block_time: float = Field(1.0, ge=0, description="Seconds between blocks; 0 produces blocks back to back.")
    persist_interval_s: float = Field(1.0, ge=0, description="Longest time an unchanged head goes unsaved.")
    receipts_kept: int = Field(2048, ge=16, description="Blocks whose extrinsic receipts stay queryable.")
    inclusion_timeout_s: float = Field(120.0, gt=0, description="Longest a submit waits for its block.")
    drand_pulses: Path | None = Field(None, description="Recorded drand quicknet pulses (JSON) for reveals.")
    drand_url: str | None = Field(None, description="drand HTTP relay asked for pulses (online use only).")


@dataclass
class _Pending:
    hash: str
    signer: str
    nonce: int
    call: DevnetCall
    included: asyncio.Future = field(repr=False)


def _dispatch_error(pallet: str, name: str) -> dict:
    """The DispatchError a real runtime reports: `Module{index, error}` from the SDK's own error catalog."""
    key = _ERROR_INDEX.get((pallet, name))
    if key is None:
        return {"Other": name}
    return {"Module": {"index": key[0], "error": f"0x{key[1]:02x}000000"}}


def _record(index: int, module: str, event_id: str, attributes: Any) -> dict:
    return {
        "phase": {"ApplyExtrinsic": index},
        "extrinsic_idx": index,
        "event": {"module_id": module, "event_id": event_id, "attributes": attributes},
    }


class ChainServer:
    """Block production, the extrinsic pool and the `/rpc` endpoint around one `ChainState`."""

    def __init__(self, config: ChainServerConfig, state: ChainState | None = None):
        self.config = config
        self.state = state if state is not None else load_state(config.state_dir)
        self._pool: list[_Pending] = []
        self._receipts: OrderedDict[int, list[dict]] = OrderedDict()
        self._new_block = asyncio.Event()
        self._last_save = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._producer: asyncio.Task | None = None
        self._stopping = False
        self.port = config.port
        self._pulses = pulse_source(config.drand_pulses, config.drand_url)
        self._methods = {
            "info": self._info, "block_hash": self._block_hash, "header": self._header,
            "wait_block": self._wait_block, "get_block": self._get_block, "query": self._query,
            "query_map": self._query_map, "query_batch": self._query_batch,
            "runtime_call": self._runtime_call, "constant": self._constant, "events": self._events,
            "account_next_index": self._account_next_index, "submit": self._submit,
            "find_extrinsic": self._find_extrinsic,
        }

    @property
    def url(self) -> str:
        return f"devnet://{HOST}:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/rpc", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the real port when 0 was asked for
        self._producer = asyncio.create_task(self._produce_forever())

    async def stop(self) -> None:
        """Stop producing, answer every waiting client, save the head, close the socket."""
        self._stopping = True
        if self._producer is not None:
            self._producer.cancel()
            await asyncio.gather(self._producer, return_exceptions=True)
        for p in self._pool:
            if not p.included.done():
                p.included.set_result(None)
        self._pool.clear()
        self._new_block.set()
        save_state(self.config.state_dir, self.state)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _produce_forever(self) -> None:
        next_at = time.monotonic() + self.config.block_time
        while True:
            delay = next_at - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
            next_at = max(next_at + self.config.block_time, time.monotonic())
            self.produce_one()

    def produce_one(self) -> int:
        """Build the next block: timestamp, pool extrinsics in order, due epochs; save; wake waiters."""
        st = self.state
        now_ms = int(time.time() * 1000)
        if self._pulses is not None and st.timelocked:
            feed_pulses(st, self._pulses.signature)  # the drand pallet's write_pulse, for rounds in use
        epoch_events = produce_block(st, now_ms)
        number, bh = st.block, block_hash(st.genesis, st.block)
        receipts = [{"index": 0, "hash": None, "success": True, "events": [
            _record(0, "System", "ExtrinsicSuccess", {"dispatch_info": {}})], "error": None}]
        pool, self._pool = self._pool, []
        for index, p in enumerate(pool, start=1):
            st.accounts.setdefault(p.signer, st.account(p.signer)).nonce += 1
            try:
                events = dispatch(st, p.signer, p.call.module, p.call.function, p.call.params)
                records = [_record(index, e["module_id"], e["event_id"], e["attributes"]) for e in events]
                records.append(_record(index, "System", "ExtrinsicSuccess", {"dispatch_info": {}}))
                receipt = {"index": index, "hash": p.hash, "success": True, "events": records, "error": None}
            except DispatchError as exc:
                error = _dispatch_error(exc.pallet, exc.name)
                records = [_record(index, "System", "ExtrinsicFailed", {"dispatch_error": error})]
                receipt = {"index": index, "hash": p.hash, "success": False, "events": records, "error": error}
            receipt.update(block=number, block_hash=bh)
            receipts.append(receipt)
        for e in epoch_events:
            receipts[0]["events"].append(_record(0, e["module_id"], e["event_id"], e["attributes"]))
        self._receipts[number] = receipts
        while len(self._receipts) > self.config.receipts_kept:
            self._receipts.popitem(last=False)
        # Included extrinsics are durable before anyone hears of them; otherwise a whole snapshot at most
        # every persist_interval_s (a crash then loses only empty blocks and epochs, never consistency).
        if pool or time.monotonic() - self._last_save >= self.config.persist_interval_s:
            save_state(self.config.state_dir, st)
            self._last_save = time.monotonic()
        for p, receipt in zip(pool, receipts[1:], strict=True):
            if not p.included.done():
                p.included.set_result(receipt)
        woken, self._new_block = self._new_block, asyncio.Event()
        woken.set()
        return number

    # --- rpc ---------------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            method = self._methods[body["method"]]
            params = body.get("params") or {}
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": {"kind": "bad_request", "message": "malformed devnet rpc request"}})
        try:
            return web.json_response({"result": await method(params)})
        except LookupError as exc:
            return web.json_response({"error": {"kind": "chain", "message": str(exc).strip("'\"")}})
        except (ValueError, TypeError, IndexError) as exc:
            return web.json_response({"error": {"kind": "bad_request", "message": f"bad parameters: {exc}"}})

    def _pinned_block(self, params: dict) -> int:
        bh = params.get("block_hash")
        if bh is None:
            return self.state.block
        number = block_number_of(self.state.genesis, bh)
        if number is None or number > self.state.block:
            raise LookupError(f"unknown block hash {bh}")
        return number

    def _head(self, number: int | None = None) -> dict:
        n = self.state.block if number is None else number
        parent = block_hash(self.state.genesis, n - 1) if n > 0 else "0x" + "00" * 32
        return {"number": n, "hash": block_hash(self.state.genesis, n), "parentHash": parent}

    async def _info(self, params: dict) -> dict:
        return {"genesis": self.state.genesis, "block": self.state.block, "block_time": self.config.block_time,
                "spec_version": views.SPEC_VERSION}

    async def _block_hash(self, params: dict) -> str | None:
        n = params.get("block")
        n = self.state.block if n is None else int(n)
        return block_hash(self.state.genesis, n) if 0 <= n <= self.state.block else None

    async def _header(self, params: dict) -> dict | None:
        n = params.get("block")
        n = self._pinned_block(params) if n is None else int(n)
        return self._head(n) if 0 <= n <= self.state.block else None

    async def _wait_block(self, params: dict) -> dict:
        after, timeout = int(params.get("after", -1)), min(float(params.get("timeout", 30.0)), 60.0)
        deadline = time.monotonic() + timeout
        while self.state.block <= after and not self._stopping and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._new_block.wait(), left)
            except TimeoutError:
                break
        return self._head()

    async def _get_block(self, params: dict) -> dict | None:
        header = await self._header(params)
        if header is None:
            return None
        ts = self.state.timestamp_ms(header["number"])
        inherent = {"call": {"call_module": "Timestamp", "call_function": "set",
                             "call_args": [{"name": "now", "value": ts}]}}
        extrinsics = [inherent] + [
            {"extrinsic_hash": r["hash"], "success": r["success"]} for r in self._receipts.get(header["number"], [])[1:]
        ]
        return {"header": header, "extrinsics": extrinsics}

    async def _query(self, params: dict) -> Any:
        return views.query(self.state, params["module"], params["name"], params.get("params") or [],
                           self._pinned_block(params))

    async def _query_map(self, params: dict) -> list:
        self._pinned_block(params)
        return [list(kv) for kv in views.query_map(self.state, params["module"], params["name"], params.get("params") or [])]

    async def _query_batch(self, params: dict) -> list:
        block = self._pinned_block(params)
        return [views.query(self.state, params["module"], params["name"], p, block) for p in params["param_sets"]]

    async def _runtime_call(self, params: dict) -> Any:
        self._pinned_block(params)
        return views.runtime_call(self.state, params["api"], params["method"], params.get("params") or [])

    async def _constant(self, params: dict) -> Any:
        return views.constant(self.state, params["module"], params["name"], self.config.block_time)

    async def _events(self, params: dict) -> list:
        receipts = self._receipts.get(self._pinned_block(params), [])
        return [record for r in receipts for record in r["events"]]

    async def _find_extrinsic(self, params: dict) -> dict | None:
        for r in self._receipts.get(self._pinned_block(params), []):
            if r["hash"] == params["hash"]:
                return r
        return None

    async def _account_next_index(self, params: dict) -> int:
        address = str(params["address"])
        return self.state.account(address).nonce + sum(1 for p in self._pool if p.signer == address)

    async def _submit(self, params: dict) -> dict:
        """Pool admission (decode, genesis, signature, era, nonce, call), then optionally wait for inclusion."""
        payload, signature = hex_bytes(params["payload"]), hex_bytes(params["signature"])
        try:
            body = json.loads(payload)
            call = DevnetCall(body["call"]["module"], body["call"]["function"], body["call"]["params"])
            signer, nonce, era = str(body["signer"]), int(body["nonce"]), body.get("era")
        except (ValueError, KeyError, TypeError):
            return {"rejected": "Invalid Transaction: Could not decode the extrinsic"}
        try:
            keypair = Keypair(ss58_address=signer, crypto_type=int(params.get("crypto_type", 1)))
        except Exception:
            return {"rejected": "Invalid Transaction: Invalid signing address"}
        if body.get("genesis") != self.state.genesis or not keypair.verify(payload, signature):
            return {"rejected": "Invalid Transaction: Transaction has a bad signature"}
        head = self.state.block
        if era is not None and not int(era["birth"]) <= head < int(era["birth"]) + int(era["period"]):
            return {"rejected": "Invalid Transaction: Transaction has an ancient birth block"}
        account_nonce = self.state.account(signer).nonce
        if nonce < account_nonce:
            return {"rejected": "Invalid Transaction: Transaction is outdated"}
        if nonce > await self._account_next_index({"address": signer}):
            return {"rejected": "Invalid Transaction: Transaction will be valid in the future"}
        if any(p.signer == signer and p.nonce == nonce for p in self._pool):
            return {"rejected": "Priority is too low: a transaction with this nonce is already in the pool"}
        try:
            validate_call(self.state, call.module, call.function, call.params)
        except LookupError as exc:
            return {"rejected": f"Invalid Transaction: Transaction call is not expected ({exc})"}
        except ValueError as exc:
            return {"rejected": f"Invalid Transaction: Could not decode the call ({exc})"}
        pending = _Pending(extrinsic_hash(payload, signature), signer, nonce, call,
                           asyncio.get_running_loop().create_future())
        self._pool.append(pending)
        if not params.get("wait", True):
            return {"submitted": pending.hash}
        try:
            receipt = await asyncio.wait_for(asyncio.shield(pending.included), self.config.inclusion_timeout_s)
        except TimeoutError:
            receipt = None
        if receipt is None:
            return {"rejected": "Invalid Transaction: extrinsic dropped (not included: timeout or chain stopped)"}
        return {"included": receipt}


# --- CLI --------------------------------------------------------------------------------------------------


def add_cli(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--state", required=True, type=Path, help="Devnet state folder (from `crucible devnet init`).")
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (default: a free one).")
    parser.add_argument("--block-time", type=float, default=1.0, help="Seconds per block (0 = as fast as possible).")
    parser.add_argument("--drand-pulses", type=Path, default=None,
                        help="JSON of recorded drand quicknet pulses used to reveal timelocked weight commits.")
    parser.add_argument("--drand-url", default=None,
                        help="drand HTTP relay for pulses (online only; without a source commits stay pending).")
    return parser


async def serve(config: ChainServerConfig, ready: asyncio.Event | None = None) -> int:
    """Run a chain until SIGINT/SIGTERM; print a JSON line with its URL once it listens."""
    try:
        server = ChainServer(config)
    except ChainStoreError as exc:
        print(json.dumps({"event": "chain_error", "error": str(exc)}), flush=True)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(json.dumps({"event": "chain_started", "url": server.url, "block": server.state.block,
                      "genesis": server.state.genesis, "state": str(config.state_dir),
                      "block_time": config.block_time}), flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    await server.stop()
    print(json.dumps({"event": "chain_stopped", "block": server.state.block}), flush=True)
    return 0


def run_cli(args: argparse.Namespace) -> int:
    config = ChainServerConfig(state_dir=args.state, port=args.port, block_time=args.block_time,
                               drand_pulses=args.drand_pulses, drand_url=args.drand_url)
    return asyncio.run(serve(config))


def main(argv: list[str] | None = None) -> int:
    parser = add_cli(argparse.ArgumentParser(prog="python -m devnet.chain_server", description=__doc__.split("\n")[0]))
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
