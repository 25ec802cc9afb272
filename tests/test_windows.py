"""Window arithmetic: every block belongs to exactly one window; deadlines include the grace."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.hparams import WindowHParams
from protocol.windows import blocks_until_deadline, window_bounds, window_of, window_progress


@given(block=st.integers(0, 10**9), per=st.integers(1, 1000), grace=st.integers(0, 50))
def test_block_lies_in_its_window(block, per, grace):
    hp = WindowHParams(blocks_per_window=per, upload_grace_blocks=grace)
    w = window_of(block, hp)
    bounds = window_bounds(w, hp)
    assert bounds.contains(block) and bounds.on_time(block)
    assert bounds.end_block - bounds.start_block == per
    assert bounds.deadline_block == bounds.end_block + grace
    assert window_of(bounds.end_block, hp) == w + 1
    assert 0 <= window_progress(block, hp) < 1


def test_deadline_and_lateness():
    hp = WindowHParams(blocks_per_window=10, upload_grace_blocks=2)
    b = window_bounds(3, hp)
    assert (b.start_block, b.end_block, b.deadline_block) == (30, 40, 42)
    assert b.on_time(41) and not b.on_time(42) and not b.on_time(29)
    assert blocks_until_deadline(35, 3, hp) == 7
    assert blocks_until_deadline(42, 3, hp) == 0
    with pytest.raises(ValueError):
        window_of(-1, hp)
