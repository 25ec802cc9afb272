"""The Gauntlet: how a validator scores miners, as pure functions and small state objects.

No chain, no buckets, no clock: tensors, floats and typed records in, typed records out, so every
rule can be tested as a rule. `neurons/scoring.py` feeds it a window's downloads; the stages and
scores are described in docs/protocol.md §6.

Modules:

- `filters.py`: stage 1: `sync_score` (steps behind, from the debug sample), `copy_verdicts`
  (top-k index overlap), `step_change`.
- `evaluate.py`: stage 2: `Evaluator` (loss before/after a miner's update on assigned and random
  samples), `scale_update`, `binary_moving_average`.
- `ratings.py`: `rate_window`, `Rating`: OpenSkill Plackett–Luce over a window's loss scores.
- `weights.py`: `score_window`, `final_score`, `compute_weights`, `select_peers`: scores, weights, peers.
- `records.py`: `FilterResult`, `EvalResult`, `UidState`, `WindowEntry`: the records between stages.
- `state.py`: `ScoringState`, `save_state`/`load_state`, `explain`: the validator's persisted state.
"""
