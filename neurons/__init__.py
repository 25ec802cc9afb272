"""The node: the miner and validator roles, the `crucible` command line, and dataset building.

A role is a loop over windows (`step(window)`), built from the contract (`protocol/`), the I/O
clients (`transport/`) and, for the validator, the scoring rules (`gauntlet/`). Production code
never imports the devnet: the devnet plugs its chain client and adversaries in from above
(`devnet/participant.py`). What one window does is in docs/protocol.md §3.

Roles:

- `node.py`: `Node`, `WindowContext`: chain, buckets, pages, θ; one chain read per window; `apply`.
- `miner.py`: `Miner.step`: train, compress, sign and upload, then gather and step.
- `miner_ranks.py`: `follow`: a miner's torchrun follower ranks, on rank 0's instructions.
- `validator.py`: `Validator.step`: score every miner, set weights, publish peer lists, records, checkpoints.
- `scoring.py`: `Scorer`, `evaluation_order`: a window's downloads fed to Gauntlet stages 1 and 2.
- `chain_weights.py`: fit the Gauntlet's weights to the subnet's rules (MinAllowedWeights, MaxWeightsLimit,
  version key) without paying anyone more than the chain forces.
- `publisher.py`: `Publisher`: the validator's on-time duty at each deadline: watch uploads, choose
  the window's shards, mirror them and sign the aggregate record.
- `catchup.py`: `catch_up`: from saved state, a checkpoint or θ_0, replay the windows since.
- `training.py`: `inner_train`, `make_inner_optimizer`, `mean_loss`: the inner AdamW loop.
- `pacing.py`: `Pace`: the inner steps a miner can train and still upload before the deadline.
- `distributed.py`: `DistContext`, `broadcast_work`: data-parallel inner steps under torchrun.
- `sharding.py`: `shard_model`, `ShardedCompressor`, `aggregate_rows`: FSDP2 row shards, compressed and stepped per rank.
- `sharded_eval.py`: `ShardedTheta`, `follow_validator`: the validator's θ in FSDP2 rows: stage 2 and the outer step per rank.
- `local_state.py`: `save_local_state`/`load_local_state`: θ, error feedback and AdamW, atomically.
- `node_files.py`: the state folder's file names, `append_metrics`/`read_metrics`.
- `metrics.py`: `NodeMetrics`: Prometheus gauges and counters from each window's report.

Command line and configuration:

- `cli.py`: `main`, `LazyParser`, `add_group`: `crucible` and its lazily imported sub-commands.
- `flags.py`: `Flags`, `FlagError`: argparse flags generated from a pydantic model, and back.
- `node_config.py`: `NodeConfig`, `NODE_FLAGS`: every setting of a miner or validator, typed.
- `node_cli.py`: `open_node`, `run_node`, `StartupError`: start-up checks and a node's life.
- `miner_cli.py`: `crucible miner`.
- `validator_cli.py`: `crucible validator`.
- `data_cli.py`: `crucible data prepare | train`.
- `explain_cli.py`: `crucible explain --uid U`: every component of a uid's score.

Data:

- `corpus.py`: `stdlib_documents`, `file_documents`: the offline corpus and the user's own files.
- `dataset.py`: `prepare_dataset`, `train_tokenizer`: documents → BPE tokenizer → token pages.
"""
