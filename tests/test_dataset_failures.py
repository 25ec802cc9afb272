"""Dataset failures a node must survive, and manifests it must refuse (s8 attack, code reading).

A validator whose dataset pages fail (the bucket down past the request deadline, or a page that does not match
the manifest's page table: `DatasetError`) crashed out of `Validator.step` with a traceback: `Scorer.evaluate_window`
read pages unguarded. Now a miner whose assigned pages cannot be read is not evaluated this window (no penalty,
its record says why) and if the window's random pages cannot be read stage 2 is skipped.

`parse_manifest` trusted every field of a manifest whose hash is the pinned one: a shard `file` of `../../x` made
the page-table cache write outside its folder, and a non-int `pages` raised TypeError. Every field is now checked.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from types import SimpleNamespace

import pytest

from gauntlet.records import FilterResult
from gauntlet.state import explain
from neurons.miner import Miner
from neurons.scoring import Scorer
from neurons.validator import Validator
from protocol.data import DatasetError, assign, parse_manifest
from protocol.windows import window_bounds

# --- the validator ----------------------------------------------------------------------------------------


class _FailingPages:
    """The validator's store: the real pages, except any read inside `bad` (or every read with `bad=None`)."""

    def __init__(self, store, bad: set[int] | None):
        self.store, self.bad = store, bad

    def __getattr__(self, name):
        return getattr(self.store, name)

    def pages(self, indices, split="train"):
        idx = [int(i) for i in indices]
        if self.bad is None or set(idx) <= self.bad:
            raise DatasetError(f"dataset/abc/train-00000.npy page {idx[0]}: hash … does not match the manifest's "
                               "page table")
        return self.store.pages(idx, split)


async def test_a_miner_whose_pages_fail_is_not_evaluated_and_the_validator_goes_on(network_factory, tmp_path, caplog):
    net = network_factory(miners=2, validators=1)
    vnode = await net.node("validator-0")
    validator = Validator(vnode, tmp_path / "validator")
    miners = [Miner(await net.node(f"miner-{i}"), tmp_path / f"miner-{i}") for i in range(2)]
    window = await vnode.current_window() + 1
    await validator.publish_initial_peer_list(window)
    hp = net.hp
    bad = set(assign(miners[1].node.hotkey, window, hp.data.seed, hp.samples_per_window, net.store.num_train))
    validator.scorer.store = _FailingPages(net.store, bad)  # the miners read the real pages
    await vnode.wait_for_block(window_bounds(window, hp.windows).start_block)

    reports = await asyncio.gather(*[m.step(window) for m in miners], net.publish(validator, window))
    assert all(r.uploaded for r in reports[:2]), reports
    with caplog.at_level(logging.WARNING, logger="neurons.scoring"):
        report = await validator.step(window)  # returned: no traceback
    graph = await vnode.chain.metagraph()
    good, failed = (graph.uid_of(m.node.hotkey) for m in miners)
    assert report.scored == 2 and report.evaluated == 1, report
    entry = {uid: validator.state.uids[uid].history[-1] for uid in (good, failed)}
    assert entry[good].evaluated and entry[good].not_evaluated is None
    e = entry[failed]
    assert not e.evaluated and e.slashes == [] and validator.state.uids[failed].last_evaluated is None
    assert "assigned dataset pages could not be read" in e.not_evaluated and "does not match" in e.not_evaluated
    assert "assigned dataset pages could not be read" in explain(validator.state, failed, window)
    lines = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(lines) == 1 and f"uid {failed} not evaluated" in lines[0], lines
    await net.close()


def test_random_pages_that_fail_skip_stage_2_with_the_reason(tiny_store, tiny_hp, caplog):
    scorer = Scorer.__new__(Scorer)
    scorer.hp, scorer.secret, scorer.store = tiny_hp, b"secret", _FailingPages(tiny_store, None)
    scorer.backend = None  # never reached
    filters = {uid: FilterResult(uid=uid, hotkey=f"hk{uid}", present=True, timely=True) for uid in (1, 2)}
    ctx = SimpleNamespace(window=5, seed=b"seed")
    with caplog.at_level(logging.WARNING, logger="neurons.scoring"):
        evals = scorer.evaluate_window(ctx, {1: "hk1", 2: "hk2"}, filters, fetched={})
    assert dict(evals) == {} and set(evals.not_evaluated) == {1, 2}
    assert all("stage 2 skipped" in why for why in evals.not_evaluated.values())
    assert [r.getMessage() for r in caplog.records if "stage 2 skipped" in r.getMessage()]


# --- the manifest -------------------------------------------------------------------------------------------

HEX = "ab" * 32
GOOD = {
    "version": 1, "seq_len": 8, "vocab_size": 300, "dtype": "uint16", "tokens": 64,
    "tokenizer": {"blake2b": HEX, "bytes": 10},
    "shards": [
        {"file": "train-00000.npy", "split": "train", "pages": 2, "bytes": 128 + 2 * 16, "blake2b": HEX,
         "offset": 128, "page_table": HEX},
        {"file": "heldout-00000.npy", "split": "heldout", "pages": 1, "bytes": 128 + 16, "blake2b": HEX,
         "offset": 128, "page_table": HEX},
    ],
}


def _raw(**change) -> bytes:
    body = copy.deepcopy(GOOD)
    for path, value in change.items():
        *outer, last = path.split("__")
        target = body
        for key in outer:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value
    return json.dumps(body).encode()


def test_a_well_formed_manifest_parses():
    m = parse_manifest(_raw())
    assert m.num_pages("train") == 2 and m.page_bytes == 16 and m.shards[0].file == "train-00000.npy"


@pytest.mark.parametrize("change, field", [
    ({"shards__0__file": "../../x"}, "shards[0].file"),
    ({"shards__0__file": "a/b.npy"}, "shards[0].file"),
    ({"shards__0__file": "a\\b.npy"}, "shards[0].file"),
    ({"shards__0__file": "/etc/passwd"}, "shards[0].file"),
    ({"shards__0__file": ".."}, "shards[0].file"),
    ({"shards__0__file": "."}, "shards[0].file"),
    ({"shards__0__file": ""}, "shards[0].file"),
    ({"shards__0__file": 7}, "shards[0].file"),
    ({"shards__1__file": "train-00000.npy"}, "listed twice"),
    ({"shards__0__pages": "2"}, ".pages"),
    ({"shards__0__pages": 2.0}, ".pages"),
    ({"shards__0__pages": True}, ".pages"),
    ({"shards__0__pages": -2}, ".pages"),
    ({"shards__0__pages": 0}, ".pages"),
    ({"shards__0__bytes": "160"}, ".bytes"),
    ({"shards__0__bytes": 161}, ".bytes"),
    ({"shards__0__offset": -16, "shards__0__bytes": 16}, ".offset"),
    ({"shards__0__split": "test"}, ".split"),
    ({"shards__0__blake2b": "AB" * 32}, ".blake2b"),
    ({"shards__0__page_table": "ab"}, ".page_table"),
    ({"shards__0__extra": 1}, "unknown field"),
    ({"shards__0": "train-00000.npy"}, "shards[0]"),
    ({"shards": {}}, "shards"),
    ({"shards": []}, "no train shard"),
    ({"seq_len": "8"}, "seq_len"),
    ({"seq_len": 0}, "seq_len"),
    ({"vocab_size": 8.5}, "vocab_size"),
    ({"vocab_size": 70000}, "vocab_size"),
    ({"tokens": -1}, "tokens"),
    ({"tokens": None}, "tokens"),
    ({"dtype": "float32"}, "dtype"),
    ({"dtype": "object"}, "dtype"),
    ({"dtype": 5}, "dtype"),
    ({"dtype": "nonsense"}, "dtype"),
    ({"tokenizer__blake2b": "z" * 64}, "tokenizer.blake2b"),
    ({"tokenizer__bytes": 0}, "tokenizer.bytes"),
    ({"tokenizer__bytes": False}, "tokenizer.bytes"),
    ({"tokenizer": "x"}, "tokenizer"),
    ({"version": True}, "version"),
    ({"version": 2}, "version"),
])
def test_a_bad_field_is_refused_in_one_line_naming_it(change, field):
    with pytest.raises(DatasetError) as info:
        parse_manifest(_raw(**change))
    message = str(info.value)
    assert field in message and "\n" not in message, message


def test_a_manifest_that_is_not_an_object_or_not_json_is_refused():
    for raw in (b"[]", b"not json", b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(DatasetError, match="malformed"):
            parse_manifest(raw)
