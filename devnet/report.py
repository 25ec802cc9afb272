"""The devnet's final report: `report.json` plus PNG plots, from the snapshots the launcher took.

The report answers the questions the devnet exists for (docs/protocol.md §7): do honest miners earn the
incentive when adversaries are present (`honest_incentive_share`), does the shared model learn
(`heldout_loss` per window), how much of a window miners spend computing (`miner_compute_fraction`),
and how fast the network turns windows. Miners append one JSON line per window to
`nodes/NAME/metrics.jsonl` (`neurons.node_files`: `window`, `compute_fraction`, `tokens_per_s`);
that file is the one channel, logs are never parsed.
Plots use matplotlib's `Figure` directly (Agg canvas), never pyplot's global state.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pydantic import BaseModel, Field

from devnet.chain_validators import ValidatorSummary
from devnet.fairness import FairnessSummary, summarize
from devnet.fault_report import FaultOutcome, FinalDigests
from devnet.scoreboard import HONEST, Participant, UidRow, WindowSnapshot
from neurons.node_files import read_metrics

REPORT_FILE = "report.json"
LOSS_PLOT = "heldout_loss.png"
WEIGHTS_PLOT = "weights.png"


class MinerWindowMetrics(BaseModel):
    window: int = Field(description="Window the miner worked on.")
    compute_fraction: float = Field(ge=0, description="Time training and compressing / window time.")
    tokens_per_s: float = Field(0.0, ge=0, description="Training throughput in tokens per second.")


class UidSummary(BaseModel):
    uid: int = Field(description="Uid on the subnet.")
    name: str = Field(description="Participant name.")
    kind: str = Field(description="'honest', an adversary kind, or 'external'.")
    final_weight: float | None = Field(description="Weight the validator set in the last window scored.")
    incentive: float | None = Field(description="Incentive from the metagraph at the end of the run.")
    accepted_windows: int = Field(description="Windows with a shard that passed stage 1.")
    accepted_list: list[int] = Field(description="Those windows.")


class HeldoutPoint(BaseModel):
    window: int = Field(description="The model is θ at the start of this window.")
    loss: float = Field(description="Mean next-token loss on the held-out pages.")


class ComputeSummary(BaseModel):
    mean: float | None = Field(description="Mean over honest miners and windows of the compute fraction.")
    per_miner: dict[str, float] = Field(description="Mean compute fraction per honest miner name.")
    adversaries: dict[str, float] = Field(
        default_factory=dict, description="Mean compute fraction per adversary name, apart (not in `mean`).")
    tokens_per_s: dict[str, float] = Field(description="Mean training tokens per second per miner name (all).")


class DevnetReport(BaseModel):
    windows: int = Field(description="Windows scored by the validator during the run.")
    window_range: list[int] = Field(description="[first, last] window scored, empty if none.")
    per_uid: dict[int, UidSummary] = Field(description="Per miner uid, at the end of the run.")
    honest_incentive_share: float | None = Field(
        description="Share of total miner incentive earned by honest miners at the end (None: no incentive)."
    )
    heldout_loss_initial: float | None = Field(description="Held-out loss of θ_0.")
    heldout_loss: list[HeldoutPoint] = Field(description="Held-out loss of the validator's model per window.")
    miner_compute_fraction: ComputeSummary = Field(description="Compute utilisation of miners.")
    windows_per_minute: float | None = Field(description="Windows scored per wall-clock minute.")
    wall_s: float = Field(description="Seconds from launch to stop.")
    stopped_because: str = Field(description="Why the run ended.")
    weights_per_window: dict[int, dict[int, float]] = Field(description="window -> uid -> weight set.")
    incentive_per_window: dict[int, dict[int, float]] = Field(description="window -> uid -> incentive seen.")
    events: list[str] = Field(
        default_factory=list, description="Crashes, restarts and give-ups during the run."
    )
    fairness: FairnessSummary | None = Field(
        None, description="Does pay track contribution: honest pay spread (min/max, Gini), mean weights, and "
                          "rank correlations with the measured contribution when there is one (devnet/fairness.py).")
    validators: dict[str, ValidatorSummary] = Field(
        default_factory=dict, description="Several validators: per validator name, stake share and vtrust (chain).")
    weight_spread_per_window: dict[int, float] = Field(
        default_factory=dict,
        description="Several validators: window -> largest L1 distance between their stored weight vectors.")
    faults: list[FaultOutcome] = Field(
        default_factory=list, description="--fault: per planned fault, windows lost and time to recover "
                                          "(devnet/fault_report.py).")
    final_digests: FinalDigests | None = Field(
        None, description="Every honest node's final θ digest against the validator's for the same window.")


def read_miner_metrics(node_dir: Path) -> list[MinerWindowMetrics]:
    """A miner's per-window metrics from its metrics.jsonl; malformed lines are skipped."""
    out: list[MinerWindowMetrics] = []
    for raw in read_metrics(node_dir):
        try:
            out.append(MinerWindowMetrics.model_validate(
                {k: raw[k] for k in ("window", "compute_fraction", "tokens_per_s") if k in raw}
            ))
        except ValueError:
            continue
    return out


def _per_window(snapshots: list[WindowSnapshot], field: str) -> dict[int, dict[int, float]]:
    table: dict[int, dict[int, float]] = {}
    for snap in snapshots:
        values = {r.uid: getattr(r, field) for r in snap.rows if getattr(r, field) is not None}
        table.setdefault(snap.window, {}).update(values)
    return table


def honest_share(rows: list[UidRow]) -> float | None:
    total = sum(r.incentive or 0.0 for r in rows)
    if total <= 0:
        return None
    return sum(r.incentive or 0.0 for r in rows if r.kind == HONEST) / total


def build_report(
    snapshots: list[WindowSnapshot],
    participants: list[Participant],
    miner_metrics: dict[str, tuple[list[MinerWindowMetrics], str]],
    *,
    final_rows: list[UidRow] | None = None,
    initial_loss: float | None = None,
    wall_s: float = 0.0,
    stopped_because: str = "",
    events: list[str] | None = None,
    contribution: dict[int, float] | None = None,
) -> DevnetReport:
    """Pure: everything the report says, from what the launcher collected."""
    snapshots = sorted(snapshots, key=lambda s: (s.window, s.time))
    scored = sorted({s.window for s in snapshots})
    final = final_rows if final_rows is not None else (snapshots[-1].rows if snapshots else [])
    last_by_uid: dict[int, UidRow] = {}
    accepted: dict[int, set[int]] = {}
    for snap in snapshots:
        for row in snap.rows:
            if row.weight is not None or row.uid not in last_by_uid:
                last_by_uid[row.uid] = row
            if row.accepted:
                accepted.setdefault(row.uid, set()).add(snap.window)
    per_uid = {}
    for row in final:
        scored_row = last_by_uid.get(row.uid, row)
        per_uid[row.uid] = UidSummary(
            uid=row.uid,
            name=row.name,
            kind=row.kind,
            final_weight=scored_row.weight,
            incentive=row.incentive,
            accepted_windows=len(accepted.get(row.uid, ())),
            accepted_list=sorted(accepted.get(row.uid, ())),
        )
    losses: dict[int, float] = {}
    for snap in snapshots:
        if snap.heldout_loss is not None and snap.model_window is not None:
            losses[snap.model_window] = snap.heldout_loss
    kinds = {p.name: p.kind for p in participants}
    per_miner, adversaries, tps, honest_fractions = {}, {}, {}, []
    for name, items in sorted(miner_metrics.items()):
        if items:
            fraction = statistics.fmean(m.compute_fraction for m in items)
            tps[name] = statistics.fmean(m.tokens_per_s for m in items)
            if kinds.get(name) == HONEST:
                per_miner[name] = fraction
                honest_fractions += [m.compute_fraction for m in items]
            else:  # a copycat computes nothing by design: listed, never averaged in
                adversaries[name] = fraction
    span = snapshots[-1].time - snapshots[0].time if len(snapshots) > 1 else 0.0
    weights_per_window = _per_window(snapshots, "weight")
    fairness = summarize({u: s.incentive for u, s in per_uid.items()}, {u: s.kind for u, s in per_uid.items()},
                         weights_per_window, contribution, honest=HONEST)
    return DevnetReport(
        windows=len(scored),
        window_range=[scored[0], scored[-1]] if scored else [],
        per_uid=per_uid,
        honest_incentive_share=honest_share(final),
        heldout_loss_initial=initial_loss,
        heldout_loss=[HeldoutPoint(window=w, loss=v) for w, v in sorted(losses.items())],
        miner_compute_fraction=ComputeSummary(
            mean=statistics.fmean(honest_fractions) if honest_fractions else None,
            per_miner=per_miner,
            adversaries=adversaries,
            tokens_per_s=tps,
        ),
        windows_per_minute=(len(scored) - 1) / span * 60 if span > 0 and len(scored) > 1 else None,
        wall_s=wall_s,
        stopped_because=stopped_because,
        weights_per_window=weights_per_window,
        incentive_per_window=_per_window(snapshots, "incentive"),
        events=list(events or []),
        fairness=fairness,
    )


def _figure(width: float = 7.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4), dpi=100, layout="constrained")
    return fig, fig.subplots()


def _axes(ax, xs: list[int], ys: list[float], floor: float | None = None, ceiling: float | None = None) -> None:
    """Round ticks (whole windows; 1-2-2.5-5 steps) and limits that hug the data instead of matplotlib's margins."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    if xs:
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo - 0.25, hi + 0.25) if lo == hi else ax.set_xlim(lo, hi)
    if ys:
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.04 or abs(hi) * 0.02 or 0.01
        lo, hi = lo - pad, hi + pad
        ax.set_ylim(lo if floor is None else max(floor, lo), hi if ceiling is None else min(ceiling, hi))


def plot_heldout(report: DevnetReport, path: Path) -> Path:
    fig, ax = _figure()
    if report.heldout_loss_initial is not None and report.heldout_loss:
        ax.axhline(report.heldout_loss_initial, color="grey", linestyle=":", label="θ_0")
    ax.plot(
        [p.window for p in report.heldout_loss],
        [p.loss for p in report.heldout_loss],
        marker="o",
        label="global model",
        clip_on=False,  # the axes end at the first and last point: draw those markers whole
    )
    ax.set_xlabel("window (model at its start)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Held-out loss of the global model")
    ys = [p.loss for p in report.heldout_loss]
    if ys and report.heldout_loss_initial is not None:
        ys.append(report.heldout_loss_initial)
    _axes(ax, [p.window for p in report.heldout_loss], ys)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.savefig(path, format="png")
    return path


def plot_weights(report: DevnetReport, path: Path) -> Path:
    fig, ax = _figure(width=8.5)  # room for the legend beside the plot, where it covers no line
    windows = sorted(report.weights_per_window)
    for uid, summary in sorted(report.per_uid.items()):
        xs = [w for w in windows if uid in report.weights_per_window[w]]
        ax.plot(
            xs,
            [report.weights_per_window[w][uid] for w in xs],
            marker=".",
            linestyle="-" if summary.kind == HONEST else "--",
            label=f"{uid} {summary.name}",
            clip_on=False,  # a weight of exactly 0 or 1 sits on the frame, fully drawn
        )
    ax.set_xlabel("window")
    ax.set_ylabel("weight")
    ax.set_title("Weight per uid (dashed: adversaries)")
    weights = [v for per in report.weights_per_window.values() for v in per.values()]
    _axes(ax, windows, weights + [0.0], floor=0.0, ceiling=1.0)
    ax.grid(alpha=0.3)
    if report.per_uid:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, format="png")
    return path


def write_report(report: DevnetReport, out_dir: Path) -> Path:
    """report.json and the two plots in `out_dir`; returns the report.json path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(report.model_dump_json(indent=2))
    tmp.replace(path)
    plot_heldout(report, out_dir / LOSS_PLOT)
    plot_weights(report, out_dir / WEIGHTS_PLOT)
    return path
