"""Validator.step on a real devnet chain + S3: weights each window, honest miners on top, restart-safe."""

from __future__ import annotations

import asyncio

from devnet.adversaries import make_adversary
from gauntlet.state import explain, load_state
from neurons.explain_cli import run_cli as explain_cli
from neurons.miner import Miner
from neurons.node_files import SCORES_FILE
from neurons.validator import Validator
from protocol.model import param_digest
from protocol.storage_keys import peers_key
from protocol.windows import window_bounds

WINDOWS = 5


async def _loop(node_obj, first: int, count: int) -> list:
    return [await node_obj.step(w) for w in range(first, first + count)]


async def test_honest_miners_earn_the_highest_weights(network_factory, tmp_path, capsys):
    net = network_factory(miners=3, validators=1)
    vnode = await net.node("validator-0")
    validator = Validator(vnode, tmp_path / "validator")
    honest = [Miner(await net.node(f"miner-{i}"), tmp_path / f"miner-{i}") for i in range(2)]
    noise = make_adversary("noise", await net.node("miner-2"), tmp_path / "miner-2")
    first = await vnode.current_window() + 1
    for w in range(first, first + net.hp.peers.lead_windows):
        await validator.publish_initial_peer_list(w)
    await vnode.wait_for_block(window_bounds(first, net.hp.windows).start_block)

    publishing = asyncio.create_task(validator.publisher.run(first))  # as Validator.run does
    results = await asyncio.gather(
        _loop(validator, first, WINDOWS), *[_loop(m, first, WINDOWS) for m in [*honest, noise]]
    )
    publishing.cancel()
    reports = results[0]
    assert all(r.weights_set for r in reports), [r.note for r in reports]
    details = [(m.kind, [(r.window, r.uploaded, r.note) for r in rs]) for m, rs in zip([*honest, noise], results[1:], strict=True)]
    # every shard that went up on time is evaluated (on a loaded CI machine a miner may miss one deadline)
    uploaded = [sum(rs[i].uploaded for rs in results[1:]) for i in range(WINDOWS)]
    evaluated = [r.evaluated for r in reports]
    assert all(e <= u and (e > 0) == (u > 0) for e, u in zip(evaluated, uploaded, strict=True)), (evaluated, uploaded, details)
    assert sum(evaluated) >= 3 * (WINDOWS - 1), (evaluated, details)
    graph = await vnode.chain.metagraph()
    uid = {m: graph.uid_of(m.node.hotkey) for m in [*honest, noise]}
    final = reports[-1].weights
    assert min(final[uid[m]] for m in honest) > final[uid[noise]], final
    assert sum(final.values()) > 0.99
    # the validator stepped exactly like the honest miners did
    assert param_digest(vnode.model) == param_digest(honest[0].node.model) == param_digest(honest[1].node.model)
    assert sum(r.stepped for r in reports) >= WINDOWS - 1, [r.note for r in reports]
    # window w's scores chose the peers of w + lead; a list that appears after its window's deadline counts for nobody
    last = first + WINDOWS - 1
    assert vnode.bucket.exists(peers_key(last + net.hp.peers.lead_windows))
    first_ctx = await vnode.window(first)
    assert await vnode.find_peer_list(first_ctx) is not None
    vnode.bucket.put(peers_key(first), vnode.bucket.get(peers_key(first), 1 << 20))
    assert await vnode.find_peer_list(first_ctx) is None

    state = load_state(tmp_path / "validator" / SCORES_FILE)
    text = explain(state, uid[noise], first + WINDOWS - 1)
    assert "loss" in text.lower()
    args = type("Args", (), {"uid": uid[honest[0]], "window": None, "state_dir": tmp_path / "validator"})
    assert explain_cli(args) == 0
    assert str(uid[honest[0]]) in capsys.readouterr().out

    # a validator restarted from its files has the same ratings
    again = Validator(vnode, tmp_path / "validator")
    assert again.state.model_dump() == validator.state.model_dump()
    await net.close()


def test_a_checkpoint_window_missed_while_behind_is_made_up_at_the_next_step(tiny_hp):
    from types import SimpleNamespace

    from neurons.publisher import Publisher

    every = tiny_hp.checkpoints.every_windows
    fresh = SimpleNamespace(hp=tiny_hp, last_checkpoint=None)
    assert [w for w in range(1, 3 * every) if Publisher.checkpoint_due(fresh, w)] == [every, 2 * every]
    behind = SimpleNamespace(hp=tiny_hp, last_checkpoint=every)  # window 2K was skipped (sync_to), not stepped
    assert not Publisher.checkpoint_due(behind, 2 * every - 1)
    assert Publisher.checkpoint_due(behind, 2 * every + 3)  # the first step after it publishes
