"""Typed records passed between the Gauntlet's stages and kept in the validator's scoring state.

Stage 1 (`filters`) produces a `FilterResult` per miner, stage 2 (`evaluate`) an `EvalResult`,
the window step (`weights.score_window`) folds both into per-uid `UidState` and appends a
`WindowEntry` to its bounded history, which `state.explain` prints. Keeping them in one module lets
every stage, the state file and the `crucible explain` command agree on field names and meanings.
Records hold plain floats and strings only (no tensors), so they serialise to JSON exactly.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

CONTROL_MIN = 0.25
"""A memory control must lower the random loss by at least this × the reference's, else it is not used
(`EvalResult.memory_margin`): honest controls sit at ≈ 1 (docs/incentives.md)."""


class _Record(BaseModel):
    # Infinity/NaN must survive the JSON round trip of the state file (a diverged loss is a fact).
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class SyncResult(_Record):
    """How far a miner's debug sample is from the validator's own parameters."""

    steps_behind: float = Field(
        description="median|θ_val − θ_miner| / the validator's own per-window change."
    )
    sync: float = Field(ge=0, le=1, description="max(0, 1 − min(x, max)/max)^exponent, 1 = fully in sync.")
    penalised: bool = Field(
        description="More than sync_penalty_steps behind: positive scores are multiplied down."
    )
    reason: str | None = Field(None, description="Why the sample could not be compared, if it could not.")


class CopyVerdict(_Record):
    """Top-k index overlap of a miner with the other uploaders of the window."""

    overlap: float = Field(ge=0, le=1, description="Largest overlap with an earlier uploader (0 if none).")
    copied_from: int | None = Field(None, description="Uid of the earlier uploader with that overlap.")
    factor: float = Field(
        ge=0, le=1, description="Multiplier on positive scores: 1, 0.5 (halve) or 0 (zero)."
    )
    twins: list[int] = Field(
        default_factory=list,
        description="Uids whose overlap with this one is ≥ copy_halve_overlap in either order (same poll round "
                    "included): copies of each other, left out of each other's memory control.",
    )


class FilterResult(_Record):
    """Stage-1 outcome for one miner in one window."""

    uid: int = Field(ge=0, description="Miner uid.")
    hotkey: str = Field(description="Miner hotkey at scoring time.")
    present: bool = Field(description="A shard for this window was found in the miner's bucket.")
    first_seen: int | None = Field(
        None, description="Validator poll round in which this shard's content hash was first seen (its own clock)."
    )
    timely: bool = Field(False, description="Seen by the validator by the deadline, and unchanged since.")
    reject_reason: str | None = Field(
        None, description="Why the shard was rejected (wire/format), if it was."
    )
    sync: SyncResult | None = Field(None, description="Sync check of the debug sample, if it ran.")
    copy_verdict: CopyVerdict | None = Field(None, description="Copy check, if it ran.")

    @property
    def eligible(self) -> bool:
        """Passed stage 1: may be evaluated in stage 2 and earn a score this window."""
        return self.present and self.timely and self.reject_reason is None


class EvalResult(_Record):
    """Stage-2 outcome: losses before/after applying the miner's update on both data sets."""

    loss_before_assigned: float = Field(
        description="Mean loss on the miner's assigned samples, model unchanged."
    )
    loss_after_assigned: float = Field(description="Same samples, after θ ← θ − step·update.")
    loss_before_random: float = Field(
        description="Mean loss on the window's random samples, model unchanged."
    )
    loss_after_random: float = Field(description="Same samples, after θ ← θ − step·update.")
    step: float = Field(description="Step size the update was applied with.")
    reference_score: float | None = Field(
        None,
        description="Loss score of the window's reference update (mean of the eligible miners' clipped "
                    "updates) on the same random batches; None if none was computed.",
    )
    loss_after_assigned_reference: float | None = Field(
        None,
        description="Mean loss on the miner's assigned samples after θ ← θ − step·reference (the memory "
                    "control, docs/incentives.md); None if no reference was applied.",
    )
    reference_count: int | None = Field(
        None, ge=1, description="Clipped updates averaged into the reference (n of its leave-one-out correction).")
    reference_twins: int = Field(
        0, ge=0, description="Of those, copies of this miner's update (CopyVerdict.twins), left out of its control.")

    @staticmethod
    def _relative(before: float, after: float) -> float:
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            return -math.inf
        return (before - after) / before

    @property
    def rel_assigned(self) -> float:
        """Relative improvement on assigned data ((before − after)/before); −inf if not finite."""
        return self._relative(self.loss_before_assigned, self.loss_after_assigned)

    @property
    def loss_score(self) -> float:
        """Relative improvement on random data: what ratings rank by; −inf if not finite."""
        return self._relative(self.loss_before_random, self.loss_after_random)

    @property
    def relative_score(self) -> float | None:
        """Loss score / the window's reference loss score: ≈ 1 for an average honest update, ≈ 0 for noise.

        Dividing by the reference removes what all miners of a window share (how much a step can still
        lower the loss at θ_w, which random batches were drawn), so windows compare. None if there is no
        usable reference (missing, not finite or not positive); −inf if the loss score is not finite.
        """
        ref = self.reference_score
        if ref is None or not math.isfinite(ref) or ref <= 0:
            return None
        s = self.loss_score
        return s / ref if math.isfinite(s) else -math.inf

    @property
    def memory_margin(self) -> float | None:
        """How much more the update helped the miner's assigned samples than a generic update would have.

        The control is the mean of the OTHER eligible miners' clipped updates, copies of this one
        (`reference_twins`, c of them) left out: nobody else trained on these samples, so what it does
        to them is what an update of no memory does to them. Its improvements come from the reference
        (the mean of all n updates) by linearity at this small step, the copies counted as this update:
        control = (n·reference − (1 + c)·own) / (n − 1 − c), on the assigned and on the random samples.
        With s = loss_score / control_random (the update's strength on random data):

            margin = (rel_assigned − s · control_assigned) / control_random

        ≈ 0 for an update that carries no memory of the assigned samples, whatever its strength (a
        freeloader, a copier); ≈ 0.4–1 for an honest one (docs/incentives.md). Comparing the two
        updates on the SAME samples removes the sample-to-sample noise that the assigned-vs-random
        comparison suffers from. None without a usable control: no other independent update, no
        reference, non-finite losses, or a control whose random improvement is below
        CONTROL_MIN × the reference's (the others are noise or harmful, so they do not stand for a
        generic update, and the division would amplify noise without bound).
        """
        n, ref, after_ref = self.reference_count, self.reference_score, self.loss_after_assigned_reference
        others = None if n is None else n - 1 - self.reference_twins
        if others is None or others < 1 or ref is None or after_ref is None:
            return None
        own_a, own_r = self.rel_assigned, self.loss_score
        ref_a = self._relative(self.loss_before_assigned, after_ref)
        if not all(math.isfinite(x) for x in (own_a, own_r, ref_a, ref)) or ref <= 0:
            return None
        copies = 1 + self.reference_twins
        control_a, control_r = (n * ref_a - copies * own_a) / others, (n * ref - copies * own_r) / others
        if control_r < CONTROL_MIN * ref:
            return None
        margin = (own_a - own_r / control_r * control_a) / control_r
        return margin if math.isfinite(margin) else None

    def indicator(self, margin: float = 0.0) -> int:
        """+1 if the update remembers the miner's own samples, else −1.

        With a control (`memory_margin`): +1 if the margin exceeds `margin` (hparams
        `gauntlet.memory_margin`). Without one (a lone eligible miner, only copies beside it, other
        updates too weak to serve, or a record from before the control existed): +1 if the assigned
        samples improved more than the random ones, the rule that needs no other miner.
        """
        m = self.memory_margin
        if m is not None:
            return 1 if m > margin else -1
        a, r = self.rel_assigned, self.loss_score
        return 1 if math.isfinite(a) and math.isfinite(r) and a > r else -1


class WindowEvals(dict[int, EvalResult]):
    """One window's stage-2 results, uid → `EvalResult`, and in `not_evaluated` uid → why an eligible uid
    chosen for stage 2 was not evaluated through no fault of its own (the validator could not read the
    dataset pages it needed). `weights.score_window` writes the reason in that uid's `WindowEntry`."""

    def __init__(self, results=(), not_evaluated: dict[int, str] | None = None):
        super().__init__(results)
        self.not_evaluated: dict[int, str] = dict(not_evaluated or {})


class WindowEntry(_Record):
    """Every score component of one uid in one window, for `crucible explain`."""

    window: int = Field(description="Window scored.")
    hotkey: str = Field(description="Hotkey the uid had in that window.")
    present: bool = Field(False, description="A shard was found.")
    timely: bool = Field(False, description="Seen by the validator by the deadline, and unchanged since.")
    first_seen: int | None = Field(None, description="Validator poll round the shard was first seen in.")
    reject_reason: str | None = Field(None, description="Wire/format rejection reason.")
    steps_behind: float | None = Field(None, description="Sync: steps behind the validator.")
    sync: float | None = Field(None, description="Sync score used this window.")
    sync_penalised: bool = Field(False, description="More than sync_penalty_steps behind.")
    sync_reason: str | None = Field(None, description="Why the debug sample could not be compared, if so.")
    copy_overlap: float | None = Field(None, description="Largest overlap with an earlier uploader.")
    copied_from: int | None = Field(None, description="Uid of that earlier uploader.")
    copy_factor: float = Field(1.0, description="Copy multiplier applied.")
    evaluated: bool = Field(False, description="Stage 2 ran for this uid.")
    not_evaluated: str | None = Field(
        None, description="Why stage 2 did not run for this eligible uid although it was chosen (this "
        "validator's trouble, e.g. dataset pages it could not read; no penalty), if so.")
    losses: EvalResult | None = Field(None, description="Stage-2 losses, if evaluated.")
    indicator: int | None = Field(
        None, description="Memory indicator counted this window (+1/−1; `EvalResult.indicator`), if evaluated.")
    binary_ma: float = Field(0.0, allow_inf_nan=False, description="Binary-indicator moving average after this window.")
    mu: float = Field(allow_inf_nan=False, description="Rating μ after this window.")
    sigma: float = Field(allow_inf_nan=False, description="Rating σ after this window.")
    relative_score: float | None = Field(
        None, description="This window's loss score / the window's reference loss score, if evaluated.")
    value: float = Field(0.0, allow_inf_nan=False, description="The uid's value (shrunk average relative score) after this window.")
    evaluations: int = Field(0, ge=0, description="Evaluations with a usable reference so far (for shrinkage).")
    memory: float = Field(
        0.0, allow_inf_nan=False,
        description="Memory factor in [0, 1] from the bias-corrected binary MA (memory_floor → 0, memory_full → 1).")
    raw_score: float = Field(0.0, allow_inf_nan=False, description="max(0, value) × memory × sync, before slashes.")
    slashes: list[str] = Field(default_factory=list, description="Multipliers applied, with their reasons.")
    score: float = Field(0.0, allow_inf_nan=False, description="Final score after slashes, decay and the zero threshold.")
    weight: float = Field(0.0, allow_inf_nan=False, description="Weight set on chain for this uid.")
    previous_weight: float | None = Field(None, description="Weight set in the window before, if any.")
    role: str | None = Field(None, description="'primary' or 'reserve' in the peer list chosen from these scores, else none.")

    @property
    def ordinal(self) -> float:
        return self.mu - 3.0 * self.sigma


class UidState(_Record):
    """What the validator remembers about one uid between windows."""

    hotkey: str = Field(description="Hotkey the state belongs to; a new hotkey on the uid resets everything.")
    mu: float = Field(allow_inf_nan=False, description="OpenSkill rating mean.")
    sigma: float = Field(gt=0, allow_inf_nan=False, description="OpenSkill rating standard deviation.")
    binary_ma: float = Field(0.0, ge=-1, le=1, allow_inf_nan=False, description="Moving average of the binary indicator.")
    value_ema: float = Field(
        0.0, allow_inf_nan=False, description="Moving average of the relative score (first evaluation: that score).")
    evaluations: int = Field(0, ge=0, description="Evaluations with a usable reference (shrinkage count).")
    indicators: int = Field(0, ge=0, description="Binary indicators folded into binary_ma (bias correction).")
    score: float = Field(0.0, ge=0, allow_inf_nan=False, description="Current final score (never negative).")
    last_evaluated: int | None = Field(None, description="Last window stage 2 ran for this uid.")
    history: list[WindowEntry] = Field(
        default_factory=list, description="Last windows' components, oldest first."
    )

    @property
    def ordinal(self) -> float:
        return self.mu - 3.0 * self.sigma
