"""One window reads the chain a fixed, small number of times: the `WindowContext` is built once.

Counted on a real devnet chain (the SDK over `DevnetSubstrate`): every `Chain` read a miner makes
during `Miner.step(window)`, and the same for `Validator.step(window)`. Before the context existed a
miner window made 12 chain reads and a validator window 20 (window bounds were recomputed, the clock
read again by each of fetch, peer-list lookup and gather, credentials asked again by each caller);
now 6 and 6.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from neurons.miner import Miner
from neurons.validator import Validator
from protocol.windows import window_bounds

READS = ("block", "block_hash", "block_timestamp", "block_time", "metagraph", "read_credentials", "uid")


def count_chain_calls(chain, names=(*READS, "wait_for_block", "set_weights")) -> Counter:
    """Wrap these methods of one `Chain` instance so each call is counted (the calls still go through).

    `block_timestamp` is also counted per block asked, under ("block_timestamp", block)."""
    counts: Counter = Counter()
    for name in names:
        method = getattr(chain, name)

        async def counted(*args, _method=method, _name=name, **kwargs):
            counts[_name] += 1
            if _name == "block_timestamp":
                counts[(_name, args[0] if args else kwargs["block"])] += 1
            return await _method(*args, **kwargs)

        setattr(chain, name, counted)
    return counts


def timestamps(calls: Counter, bounds, record_deadline: int) -> int:
    """The window's start and deadline times, each read once; a third read only for the record deadline.

    A node that looks for the aggregate record only after the record deadline has passed (a loaded
    machine: the validator's stage 2 can run past it) reads that block's time once, as the cutoff
    for records published late; a node still waiting for the record needs no cutoff."""
    asked = {key[1]: n for key, n in calls.items() if isinstance(key, tuple)}
    assert asked.get(bounds.start_block) == 1 and asked.get(bounds.deadline_block) == 1, asked
    assert set(asked) <= {bounds.start_block, bounds.deadline_block, record_deadline}, asked
    assert all(n == 1 for n in asked.values()), asked
    return sum(asked.values())


async def test_one_window_reads_the_chain_once_per_fact(network_factory, tmp_path):
    net = network_factory(miners=1, validators=1)
    vnode = await net.node("validator-0")
    validator = Validator(vnode, tmp_path / "validator")
    miner = Miner(await net.node("miner-0"), tmp_path / "miner-0")
    window = await vnode.current_window() + 1
    await validator.publish_initial_peer_list(window)
    await vnode.wait_for_block(window_bounds(window, net.hp.windows).start_block)

    bounds = window_bounds(window, net.hp.windows)
    record_deadline = bounds.deadline_block + net.hp.fetch.record_grace_blocks
    miner_calls = count_chain_calls(miner.node.chain)
    report, _pub = await asyncio.gather(miner.step(window), net.publish(validator, window))
    assert report.uploaded and report.stepped, report
    # open: first block's hash and time; upload: the head (still before the deadline?);
    # close: deadline block's time, metagraph, commitments. Waits (for blocks, for the record) are not reads.
    assert {k: miner_calls[k] for k in READS if miner_calls[k]} == {
        "block_hash": 1, "block_timestamp": timestamps(miner_calls, bounds, record_deadline), "block": 1,
        "metagraph": 1, "read_credentials": 1,
    }, miner_calls
    assert miner_calls["wait_for_block"] >= 3  # window start, deadline, then the record deadline (polled)

    validator_calls = count_chain_calls(vnode.chain)
    vreport = await validator.step(window)
    assert vreport.scored == 1 and vreport.stepped, vreport
    # the validator reads the metagraph once more right before setting weights: a uid that changed hands
    # since the deadline must not receive weight its previous owner earned (subnet rules)
    assert {k: validator_calls[k] for k in READS if validator_calls[k]} == {
        "block_hash": 1, "block_timestamp": timestamps(validator_calls, bounds, record_deadline), "metagraph": 2,
        "read_credentials": 1,
    }, validator_calls
    assert validator_calls["set_weights"] == 1
    await net.close()
