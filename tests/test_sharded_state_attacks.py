"""Hostile sharded-state folders (`neurons.local_state.load_sharded_state`) on 2 real gloo ranks.

A crash between the ranks' saves leaves rank 0's file for one window beside rank 1's for the previous
one; a hand or a bad disk leaves a header that is not what the loader expects, or a file short of a
tensor. Every rank must then start AdamW and error feedback from zero (never one rank's window with
another's, never a partial optimizer), rank 1 must not crash, and rank 0 says why in one line.
"""

import json

from tests.conftest import REPO, torchrun


def test_mixed_or_hostile_rank_files_start_every_rank_from_zero(tmp_path):
    done = torchrun([str(REPO / "tests" / "sharded_state_worker.py"), str(tmp_path)], tmp_path / "torchrun",
                    timeout=120)
    assert done.returncode == 0, done.report()
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["empty"] == {"resumed_six": True, "mixed_windows": True, "header_not_object": True,
                             "window_not_int": True, "missing_tensor": True, "truncated": True}, seen
    assert len(seen["warnings"]) == 5, seen["warnings"]
