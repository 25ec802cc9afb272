"""The sync debug sample's positions: the same on every node, unpredictable without the seed, uniform."""

from __future__ import annotations

import math

import pytest
import torch

from protocol.sample import debug_positions

NUMELS = {
    "embed.weight": 64 * 32,
    "layers.0.q.weight": 32 * 32,
    "layers.0.norm.weight": 32,
    "lm_head.weight": 2048,
}


def test_debug_positions_deterministic_in_range_and_seed_dependent():
    a = debug_positions(b"seed-1", NUMELS, 256)
    b = debug_positions(b"seed-1", dict(reversed(list(NUMELS.items()))), 256)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    total = sum(len(v) for v in a.values())
    assert 200 <= total <= 256  # de-duplicated draws
    for name, idx in a.items():
        assert idx.dtype == torch.int64
        assert int(idx.min()) >= 0 and int(idx.max()) < NUMELS[name]
        assert torch.equal(idx, torch.unique(idx))
    c = debug_positions(b"seed-2", NUMELS, 256)
    flat_a = {(k, int(i)) for k, v in a.items() for i in v}
    flat_c = {(k, int(i)) for k, v in c.items() for i in v}
    # Another seed gives an essentially unrelated sample (expected overlap ~256/5152 ≈ 5 %).
    assert len(flat_a & flat_c) < 0.15 * len(flat_a)


def test_debug_positions_are_uniform_over_values():
    big = {k: n * 1000 for k, n in NUMELS.items()}  # large enough that duplicate draws are rare
    pos = debug_positions(b"uniform", big, 4000)
    total = sum(big.values())
    for name, numel in big.items():
        got = len(pos.get(name, []))
        expected = numel / total * 4000
        assert abs(got - expected) < 5 * math.sqrt(expected) + 5


def test_debug_positions_rejects_bad_n_and_handles_empty():
    with pytest.raises(ValueError):
        debug_positions(b"x", NUMELS, 0)
    assert debug_positions(b"x", {}, 8) == {}
