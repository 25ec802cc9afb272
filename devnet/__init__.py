"""The devnet: a whole Crucible network on one machine, with no accounts and no internet.

It runs the production miners and validators unchanged, as separate processes, against a simulated
subtensor reached through the real `bittensor` SDK (a `Substrate` backend) and an embedded S3
server; adversarial miners show that the Gauntlet does not pay for bad work. `crucible devnet run`
is the demo; `init`, `chain` and `s3` start its parts one by one.

Launching and watching:

- `cli.py`: `crucible devnet [run | init | chain | s3 | miner | validator]`.
- `launcher.py`: `Devnet`: start everything, run W windows, write the report.
- `launch_plan.py`: `DevnetConfig`, `DEVNET_FLAGS`, `plan_participants`, `node_spec`: what a run starts (config,
  devnet folder, dataset published and pinned, each node's command line), built before anything starts.
- `participant.py`: `DevnetNode` (`MINER`, `VALIDATOR`): the production node with the devnet's
  chain client and, optionally, an adversary plugged in.
- `adversaries.py`: `make_adversary`, `NoiseMiner`, `CopycatMiner`, ...: `Miner` subclasses that cheat.
- `supervisor.py`: `Supervisor`, `ChildSpec`: child processes, restarts, clean shutdown.
- `faults.py`: `parse_fault`, `FaultRunner`, `FaultyPool`: the `--fault` plan (kill -9, storage or chain
  stall, one peer unreachable for one node, a shard deleted), applied at chain windows.
- `fault_report.py`: `summarize_faults`, `final_digests`: windows lost and time to recover per fault,
  every honest node's final θ digest against the validator's (the report's `faults`, `final_digests`).
- `bootstrap.py`: `init_devnet`, `DevnetManifest`: wallets, subnet, registrations, stake (genesis).
- `s3.py`: `S3Server`: `rclone serve s3` over a local folder, one bucket per participant.
- `hostile_s3.py`: `HostileS3`, `Behaviour`: a lying S3 proxy in front of it (forged times, swapped
  bodies, trickle, hang, false lengths, redirects) for tests and `crucible bench fetch`.
- `hostile_s3_behaviour.py`: `Behaviour`, `ClientInfo`, `Seen`: the proxy's lies (its rules, forged times and
  bodies, re-signed uploads, delay, hang, trickle, false lengths) and the code that tells them.
- `hostile_s3_http.py`: the proxy's own HTTP/1.1 server: keep-alive connections, bounded requests, S3 op.
- `scoreboard.py`: `Scoreboard`, `WindowSnapshot`: per-uid scores, weights, incentive, held-out loss.
- `dashboard.py`: `Dashboard`: the live scoreboard in a browser (aiohttp, loopback only).
- `dashboard_page.py`: the dashboard's single self-contained HTML page.
- `report.py`: `build_report`, `write_report`: `report.json` and PNG plots at the end of a run.
- `fairness.py`: `summarize`, `gini`, `spearman`, `kendall`: does pay track contribution (the report's `fairness`).
- `contribution.py`: devnet-only ground truth: each accepted update's held-out loss change alone.
- `profiles.py`: `degrade`, `apply_profile`: honest miners of graded update quality (`--miner-profile`).

The simulated chain:

- `chain_state.py`: `ChainState`, `dispatch`: subtensor's state and rules for the parts Crucible uses.
- `chain_epoch.py`: `produce_block`, `run_epoch`: blocks, tempos and emission.
- `chain_commit_reveal.py`: `commit_timelocked`, `reveal_due`: timelocked weight commits and their reveal.
- `chain_pulses.py`: `RecordedPulses`, `DrandRelay`: where the chain gets drand pulses to reveal with.
- `chain_yuma.py`: `yuma`: Yuma-style consensus from weights to incentive and dividends.
- `chain_views.py`: `query`, `runtime_call`, `metagraph`: the state as the SDK's decoded values.
- `chain_wire.py`: `signing_payload`, `canonical_json`, `block_hash`: what client and chain agree on.
- `chain_store.py`: `save_state`/`load_state`: the chain's state file, replaced atomically.
- `chain_validators.py`: per-validator stake share, vtrust and weight spread read from the chain each window.
- `chain_server.py`: `ChainServer`: the chain process (aiohttp), blocks and signed extrinsics.
- `substrate.py`: `DevnetSubstrate`, `devnet_client`: the SDK's `Substrate` seam backed by the chain process.
"""
