"""`crucible devnet run --subnet-param CommitRevealWeightsEnabled=true` ran to the end with vtrust 0.000 and
"honest incentive share n/a" and said nothing at all (seen in a devnet run): the launcher's chain has no drand
pulses, so commits are never revealed (docs/protocol.md says so; the run did not). It now says it at start."""

from devnet.launch_plan import DevnetConfig, commit_reveal_note, prepare_state
from protocol.hparams import load_hparams


def test_the_run_says_at_start_that_commits_will_not_be_revealed(tmp_path):
    hp = load_hparams("tiny")
    on = DevnetConfig(miners=1, state=tmp_path / "on", subnet_params=["CommitRevealWeightsEnabled=true"])
    note = commit_reveal_note(on, prepare_state(on, hp))
    assert note is not None and "never revealed" in note and "no incentive" in note
    off = DevnetConfig(miners=1, state=tmp_path / "off")
    assert commit_reveal_note(off, prepare_state(off, hp)) is None
