"""Benchmarks: each prints JSON and measures its baseline in the same run (`crucible bench NAME`).

Outside the node's packages, like torchtitan's `benchmarks/`: a bench may import anything, and
nothing imports a bench. Targets are in docs/protocol.md §7.

Modules:

- `cli.py`: `BENCHES`, `add_cli`/`run_cli`: the `crucible bench` group, `print_json`.
- `codec.py`: SparseLoCo encode/decode speed and bytes on the wire vs a plain tensor copy.
- `convergence.py`: SparseLoCo vs DiLoCo vs data-parallel AdamW on equal tokens (`benchmark`).
- `convergence_methods.py`: `run_sparseloco`, `run_diloco`, `run_dp_adamw`, `Workload`: the methods.
- `validator.py`: seconds to evaluate one miner vs its floor (3 passes per miner + 1 per window); `--synthetic`.
- `memory.py`: bytes per rank (params, grads, AdamW, error feedback, activations, codec) and GPUs needed.
- `gpu.py`: the device check: one miner window, tokens/s, MFU, peak memory, codec and stage-2 seconds.
- `storage.py`: put/get throughput through `transport.bucket.Bucket`.
- `fetch.py`: a validator's `ShardSource.fetch` of N shards when k buckets (behind the hostile proxy)
  trickle or hang, vs all healthy, against the deadline bound.
- `dataset.py`: pages/s of `transport.dataset.RemotePageStore` vs the local `PageStore`, window-start
  wait with and without prefetch.
- `prepare.py`: peak resident memory and speed of `crucible data prepare` on a large synthetic text file
  vs the offline corpus.
- `resident.py`: `PeakRSS`: a block's peak resident memory, sampled from /proc (torch's CPU allocations).
- `reference_loss.py`: `run_reference`: the tiny SparseLoCo loss curve stored in
  `tests/assets/losses/` (`crucible bench reference-loss --write` regenerates it).
"""
