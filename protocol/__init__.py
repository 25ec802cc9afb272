"""The network's contract: everything every participant must compute alike, and nothing else.

No I/O clients live here (no boto3, no chain client, no argparse, no threads): a module belongs in
`protocol/` when two honest nodes must agree on its result bit for bit. Buckets and the chain are
reached through `transport/`; scoring is `gauntlet/`; the node roles are `neurons/`. The whole
protocol, step by step, is in docs/protocol.md.

One window w, in time order (docs/protocol.md §3):

    miner      at w's first block: seed = blake2b(netuid, w, block hash)       windows, data.assign
               H inner AdamW steps on its assigned samples, Δ = θ_w − θ_local   model, hparams
               error feedback + chunked top-k + 2-bit codes                     codec
               signed shard with a debug sample of θ_w, uploaded before         sample, wire, storage_keys
               the deadline block (window end + grace)
    everybody  after the deadline: the peer list for w (highest-stake           peers
               validator, uploaded in time), first valid shards in list order,  gather, wire.read_shard
               median-norm clip, float64 mean in sorted order, θ_{w+1} =        codec_aggregate
               θ_w − α·mean, the same bits on every honest node
    validator  stage 1 on every shard, stage 2 on as many as the budget allows, (gauntlet/)
               weights on chain, the peer list for w + 2, the aggregate record  peers
               for w, a checkpoint every K windows                              model

Modules:

- `hparams.py`: `HParams`, `load_hparams`: every network number, grouped by component, with presets.
- `windows.py`: `window_of`, `window_bounds` (`WindowBounds`): block → window arithmetic, deadlines.
- `model.py`: `build_model` (θ_0 from a private RNG), `param_shapes`, `save_checkpoint`/`load_checkpoint`.
- `data.py`: `PageStore` (tokenized pages on disk), `assign`, `random_samples`, `samples_digest`.
- `codec.py`: `Compressor`: SparseLoCo error feedback, chunked top-k, 2-bit quantisation, bit packing.
- `codec_aggregate.py`: `aggregate_encoded`, `clip_factors`, `apply_outer_step`: the consensus arithmetic.
- `sample.py`: `debug_positions`, `gather_sample`: the sync debug sample a shard carries.
- `wire.py`: `write_shard`, `read_shard` (`ShardHeader`, `ShardRules`, `RejectReason`): the shard file.
- `peers.py`: `PeerList`, `make_peer_list`, `read_peer_list`, `AggregateRecord`: what validators sign.
- `gather.py`: `gather` (`Fetched`, `GatherResult`, `FetchOutcome`): which shards make the update.
- `storage_keys.py`: `gradient_key`, `peers_key`, `aggregate_key`, `checkpoint_key`, `parse_key`.
- `storage_config.py`: `BucketConfig`, `BucketCredentials`: a bucket's address and key pairs.
- `chain_commitment.py`: `encode_credentials`, `parse_credentials`: read credentials as a commitment.
- `endpoint_policy.py`: `endpoint_problem`, `EndpointAllowance`: which bucket endpoints a node may connect to.
- `atomic.py`: `atomic_write`: crash-safe file replacement for every persisted state.
"""
