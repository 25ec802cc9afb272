"""Gauntlet stage 1: the cheap checks every miner's shard goes through before any evaluation.

* Timeliness is the validator's own observation (`transport.watch`); a late or changed shard
  reaches this module only as a reason.
* Sync: each shard carries a debug sample of the miner's parameters at positions drawn from the
  window's seed (`protocol.sample`), so a lazy miner cannot track a fixed handful of scalars (the
  anchor compares two fixed values per tensor). The validator compares them with its own values:
  x = median|θ_val − θ_miner| / (its own recent per-window change of the same values) is "how many
  windows behind" the miner is; sync = max(0, 1 − min(x, max)/max)^exponent.
* Copies: two honest miners' top-k index sets overlap about as much as random sets (≈ the top-k
  density, 1.6 %); a re-uploaded shard overlaps almost fully. Of a pair with a large overlap, the
  one the validator saw LATER is named the copier and its positive score is halved or zeroed.
  Up to EXACT_MINERS (16) miners the overlaps are exact. Beyond, they are read on a position sample
  (rate r = 16/m, the same positions for every miner, drawn afresh each window from the validator's
  secret and the window's shards), which makes them estimates with a statistical bound, not a
  guarantee. For a copier sharing p of its victim's n₀ kept positions (n = r·n₀ counted):
    - the estimate p̂ has standard error σ = √(p(1 − p)(1 − r)/n) and reads high by a relative
      √((1 − p)(1 − r)/(π n)) (the smaller of two sampled sizes is the denominator);
    - the hash is only pairwise independent, so the guaranteed tail is Chebyshev's, for ANY position
      set a miner picks without the secret: P(|p̂ − p| ≥ t) ≤ σ²/t². A copier whose true overlap is
      copy_zero_overlap + δ escapes zeroing in a window with probability ≤ σ²/δ² (and is still halved
      unless it is also below copy_halve_overlap). At 150m with 256 miners (n ≈ 131k): σ ≤ 0.13 %, so
      δ = 1 % gives ≤ 1.8 %, δ = 2 % ≤ 0.5 % (Gaussian tails, which the tests observe, give far less).
      With a small model the bound widens as 1/√n: at n = 500 (e.g. 8k kept positions, 256 miners)
      σ ≈ 2.1 % at p = 0.6. A copier within a few σ of a threshold is a coin flip by design.
  Cost: the sort plus, per sorted entry, fewer than max(8, m/8)/2 enumerated pairs or m²/max(8, m/8)
  multiply-adds (positions held by many miners are counted as a dense product), whatever the miners
  sent, so sybils sharing one shard cannot make stage 1 quadratic in their number.

Shard format rejections come from the wire module (a `RejectReason` str enum); they are carried as
plain strings in `FilterResult.reject_reason`. Everything here is pure: tensors and floats in,
typed records out, and malformed untrusted input gives a record with a reason, never an exception.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np
import torch

from gauntlet.records import CopyVerdict, SyncResult
from protocol.codec import EncodedTensor, unpack12
from protocol.hparams import GauntletHParams

Time = float | int | datetime


def to_posix(t: Time) -> float:
    """POSIX seconds of a float or a datetime; a naive datetime is taken as UTC."""
    if isinstance(t, datetime):
        return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()
    return float(t)


def _flatten_sample(sample: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([sample[k].detach().reshape(-1).to("cpu", torch.float64) for k in names])


def step_change(current: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor]) -> float:
    """median|θ_w − θ_{w−1}| over a sample: the validator's own per-window change of those values."""
    names = sorted(current)
    if sorted(previous) != names:
        raise ValueError("current and previous samples must cover the same parameters")
    if not names:
        return 0.0
    return float((_flatten_sample(current, names) - _flatten_sample(previous, names)).abs().median())


def sync_curve(steps_behind: float, hp: GauntletHParams) -> float:
    """max(0, 1 − min(x, max)/max)^exponent: 1 at 0 steps, 0 at sync_max_steps and beyond."""
    if not math.isfinite(steps_behind):
        return 0.0
    x = min(max(steps_behind, 0.0), hp.sync_max_steps)
    return max(0.0, 1.0 - x / hp.sync_max_steps) ** hp.sync_exponent


def _out_of_sync(reason: str) -> SyncResult:
    return SyncResult(steps_behind=math.inf, sync=0.0, penalised=True, reason=reason)


def sync_score(
    own: Mapping[str, torch.Tensor],
    miner: Mapping[str, torch.Tensor],
    reference_change: float | None,
    hp: GauntletHParams,
) -> SyncResult:
    """Compare the miner's debug sample with the validator's own values at the same positions.

    `reference_change` is the validator's recent per-window change of parameter values (see
    `step_change`). When it is missing or zero (no window has changed the model yet), identical
    samples count as 0 steps behind and any difference as fully out of sync.
    """
    names = sorted(own)
    if sorted(miner) != names:
        return _out_of_sync("debug sample covers different parameters than the window's positions")
    for k in names:
        if miner[k].numel() != own[k].numel():
            return _out_of_sync(
                f"debug sample for {k} has {miner[k].numel()} values, expected {own[k].numel()}"
            )
        if not miner[k].is_floating_point():
            return _out_of_sync(f"debug sample for {k} is not floating point")
    if not names:
        return _out_of_sync("empty debug sample")
    theirs = _flatten_sample(miner, names)
    if not torch.isfinite(theirs).all():
        return _out_of_sync("debug sample has non-finite values")
    gap = float((_flatten_sample(own, names) - theirs).abs().median())
    if reference_change is not None and math.isfinite(reference_change) and reference_change > 0:
        x = gap / reference_change
    else:
        x = 0.0 if gap == 0.0 else math.inf
    return SyncResult(steps_behind=x, sync=sync_curve(x, hp), penalised=x > hp.sync_penalty_steps)


IndexSet = torch.Tensor | Mapping[str, "torch.Tensor | EncodedTensor"]

# Entries (miners × kept values) sorted together at once when encoded shards are compared chunk slab by
# chunk slab: ~2**23 int32 keys (32 MiB, a few times that with the sort's temporaries), whatever the
# number of miners, so stage 1's memory is bounded by the shards themselves plus this slab.
SLAB_ENTRIES = 1 << 23
# Up to this many miners the overlaps are counted exactly. Beyond, each miner's positions are sampled
# with one secret hash (the same positions for every miner) at rate EXACT_MINERS / m: a position is held
# by ~m·density miners, so exact pair counting costs O(m²·K·density) and sampling keeps it O(m·K).
EXACT_MINERS = 16


def sample_rate(miners: int) -> float:
    """Share of positions whose overlaps are counted: 1 up to EXACT_MINERS miners, EXACT_MINERS / m beyond."""
    return 1.0 if miners <= EXACT_MINERS else EXACT_MINERS / miners


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _sampled(keys: torch.Tensor, rate: float, salt: int) -> torch.Tensor:
    """The keys whose secret hash falls below `rate`: multiply-shift (the high 32 bits of a·k + b mod 2⁶⁴,
    a odd; a and b drawn from the salt by blake2b), a universal hash family.

    Consistent (a position is kept for every miner or for none) and, without the salt, unpredictable:
    a copier cannot tell which of its copied positions are the counted ones."""
    if rate >= 1.0:
        return keys
    digest = hashlib.blake2b((salt % (1 << 128)).to_bytes(16, "little"), digest_size=16).digest()
    a = _signed64(int.from_bytes(digest[:8], "little") | 1)
    b = _signed64(int.from_bytes(digest[8:], "little"))
    h = ((keys.to(torch.int64) * a + b) >> 32) & 0xFFFFFFFF  # int64 arithmetic wraps mod 2⁶⁴
    return keys[h < int(rate * (1 << 32))]


KEY_PARAMS = 4  # parameters per miner that enter the window's sample key (each table moves every window)


def _window_key(salt: int, sets: list[dict[str, torch.Tensor | EncodedTensor]]) -> int:
    """The sample's hash key for this window: the validator's secret, keyed into blake2b over a digest
    of every miner's shard (its first KEY_PARAMS parameters' 4-entry tables and first index bytes; a
    plain tensor's size and first entries). A fixed key would be the same sample every window, and the copy factor a miner's weight
    reveals (or a published overlap) would let sybils holding chosen positions learn it over windows,
    then copy a victim only where nobody looks. Honest shards change every window, so the sample does;
    nobody without the secret can predict it, and the same shards give the same verdicts."""
    h = hashlib.blake2b(key=(salt % (1 << 128)).to_bytes(16, "little"), digest_size=16, person=b"crucible-copy")
    for i, s in enumerate(sets):
        h.update(i.to_bytes(4, "little"))
        for name in sorted(s)[:KEY_PARAMS]:
            enc = s[name]
            h.update(name.encode("utf-8", "surrogatepass") + b"\0")
            if isinstance(enc, EncodedTensor):
                h.update(enc.lookup.detach().to("cpu", torch.float32).numpy().tobytes())
                h.update(enc.idx[:48].detach().cpu().numpy().tobytes())
            else:
                flat = enc.detach().reshape(-1)
                h.update(flat.numel().to_bytes(8, "little") + flat[:64].to("cpu", torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def _unique_positions(name: str, idx: torch.Tensor) -> torch.Tensor:
    if idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"indices for {name!r} must be an integer tensor")
    return torch.unique(idx.reshape(-1).to(torch.int64))


def _per_param(indices: IndexSet) -> dict[str, torch.Tensor | EncodedTensor]:
    """One miner's top-k positions per parameter (a flat tensor is one unnamed parameter).

    Plain tensors are validated here (integer dtype); encoded tensors stay encoded and are unpacked
    slab by slab only when compared.
    """
    if isinstance(indices, torch.Tensor):
        indices = {"": indices}
    out: dict[str, torch.Tensor | EncodedTensor] = {}
    for name, idx in indices.items():
        if isinstance(idx, EncodedTensor):
            out[name] = idx
        else:
            if idx.is_floating_point() or idx.is_complex():
                raise ValueError(f"indices for {name!r} must be an integer tensor")
            out[name] = idx
    return out


def _slab_indices(enc: EncodedTensor, c0: int, c1: int) -> torch.Tensor:
    """In-chunk indices of chunks [c0, c1) as int64 [c1 − c0, k], unpacked from only their bytes."""
    lay = enc.layout
    first, n = c0 * lay.k, (c1 - c0) * lay.k
    if first % 2:  # slabs start on an even value index; a 1-chunk odd-k layout is unpacked whole
        return enc.indices()[c0:c1]
    data = enc.idx[3 * (first // 2) : 3 * (first // 2) + 3 * ((n + 1) // 2)]
    return unpack12(data.cpu(), n, torch.int32).reshape(c1 - c0, lay.k)


# A position held by r miners gives r(r − 1)/2 sharing pairs. Runs at least this long (LONG_RUN_MIN, or
# m / LONG_RUN_DIV for m miners) are counted as a dense 0/1 product XᵀX over their positions instead of
# pair by pair: m² multiply-adds per position in a matmul, against r²/2 pairs through several numpy passes.
# Without it, sybils (or strongly correlated miners) sharing their positions make stage 1 quadratic in
# their number. Measured at m = 256 on 2 shared (loaded) cores, per sorted entry, relative to independent
# miners (r ≈ 4, unchanged): 256 holders of one shard ~35-45x before, ~0.5x now; the worst split now
# (r = 31, just below the dense threshold of 32) ~4-8x. The dense product runs in torch (its thread
# pool); numpy's BLAS brought a second pool that slowed the whole of stage 1 on 2 cores.
LONG_RUN_MIN = 8
LONG_RUN_DIV = 8
_DENSE_CELLS = 1 << 20  # rows × miners of one dense block (4 MiB of float32)


def _long_run(m: int) -> int:
    return max(LONG_RUN_MIN, m // LONG_RUN_DIV)


def _pair_counts(keys: np.ndarray, owner_bits: int, m: int, common: np.ndarray) -> int:
    """Add to common[a·m + b] the positions shared by miners a and b, from (key << bits | owner) codes.

    Sorting puts the miners sharing a key next to each other (owners ascending, each once: positions
    are unique per miner). Positions held by at least `_long_run(m)` miners are counted as XᵀX of their
    0/1 incidence rows (float32 sums of at most _DENSE_CELLS // m ones: exact, and 0/1 stay exact under
    TF32/bf16 matmul settings); the others pair by pair: the
    pairs at distance d are found only among the pairs at distance d − 1 (a sorted run holding i and
    i + d holds i + d − 1). Work: the sort, m² per long-run position, and fewer than `_long_run(m)`
    enumerated pairs per remaining entry, whatever the miners sent. Returns the pairs enumerated.
    """
    if keys.size < 2:
        return 0
    keys.sort(kind="stable")  # timsort: each miner's keys are already one ascending run, so this is a merge
    pos = keys >> owner_bits
    owner = (keys & ((1 << owner_bits) - 1)).astype(np.int64)
    span = max(1, _long_run(m) - 1)  # a sorted run of length >= span + 1 holds i and i + span
    if pos.size > span and bool(np.any(pos[span:] == pos[:-span])):
        new_run = np.empty(pos.size, dtype=bool)
        new_run[0] = True
        np.not_equal(pos[1:], pos[:-1], out=new_run[1:])
        starts = np.flatnonzero(new_run)
        lengths = np.diff(np.append(starts, pos.size))
        long_runs = lengths > span
        in_long = np.repeat(long_runs, lengths)
        row = np.repeat(np.cumsum(long_runs) - 1, lengths)[in_long]  # rank of the entry's run among long runs
        col = owner[in_long]
        rows_per_block = max(1, _DENSE_CELLS // m)
        upper = np.triu(np.ones((m, m), dtype=bool), 1).reshape(-1)
        n_long = int(long_runs.sum())
        for r0 in range(0, n_long, rows_per_block):
            lo, hi = np.searchsorted(row, [r0, r0 + rows_per_block])
            x = np.zeros((min(rows_per_block, n_long - r0), m), dtype=np.float32)
            x[row[lo:hi] - r0, col[lo:hi]] = 1.0
            xt = torch.from_numpy(x)  # torch's own thread pool: a second (BLAS) pool would fight it for the cores
            gram = (xt.T @ xt).numpy().reshape(-1)
            common[upper] += np.rint(gram[upper]).astype(np.int64)
        pos, owner = pos[~in_long], owner[~in_long]
    enumerated = 0
    cand = np.flatnonzero(pos[:-1] == pos[1:])
    d = 1
    while cand.size:
        a, b = owner[cand], owner[cand + d]
        enumerated += cand.size
        common += np.bincount(a * m + b, minlength=m * m)
        d += 1
        cand = cand[cand + d < pos.size]
        cand = cand[pos[cand + d] == pos[cand]]
    return enumerated


def _encoded_slabs(held: list[tuple[int, EncodedTensor]], m: int, common: np.ndarray, sizes: np.ndarray,
                   rate: float = 1.0, salt: int = 0) -> None:
    """Pair counts of one parameter whose every holder sent an encoded tensor of the same layout.

    Keys are chunk·chunk_size + in-chunk index, a bijection with the flat position, so the counts are
    those of the positions; chunks are taken in slabs of about SLAB_ENTRIES entries over all miners.
    """
    lay = held[0][1].layout
    owner_bits = max(1, (m - 1).bit_length())
    per_chunk = max(1, lay.k * len(held))
    span = max(1, SLAB_ENTRIES // per_chunk, 1)
    span = min(span, max(1, ((1 << 31) - 1) // (lay.chunk_size << owner_bits)))  # key fits int32
    if span > 1 and span % 2:
        span -= 1
    offsets = torch.arange(0, lay.chunk_size * span, lay.chunk_size, dtype=torch.int32)
    for c0 in range(0, lay.n_chunks, span):
        c1 = min(c0 + span, lay.n_chunks)
        parts = []
        for i, enc in held:
            idx = _slab_indices(enc, c0, c1).to(torch.int32)
            if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
                flat = torch.unique(idx + offsets[: c1 - c0, None])  # duplicates: count each position once
            else:
                flat = (idx + offsets[: c1 - c0, None]).reshape(-1)
            if rate < 1.0:  # hash the position itself (slab start included), so every slab samples afresh
                flat = _sampled(flat.to(torch.int64) + c0 * lay.chunk_size, rate, salt) - c0 * lay.chunk_size
                flat = flat.to(torch.int32)
            sizes[i] += flat.numel()
            parts.append((flat.numpy().astype(np.int64) << owner_bits) | i)
        _pair_counts(np.concatenate(parts), owner_bits, m, common)


def overlap_matrix(index_sets: Mapping[int, IndexSet], salt: int = 0) -> tuple[list[int], torch.Tensor]:
    """Pairwise overlap |A ∩ B| / min(|A|, |B|) of the miners' top-k index sets (uids ascending).

    Index sets are 1-D tensors of global flat positions or {param name: positions} dicts (equal
    positions in different parameters do not overlap); a dict's value may also be the parameter's
    `EncodedTensor`, whose positions are then read chunk slab by chunk slab from the packed indices
    (never a whole int64 position tensor per miner). Per parameter (or slab), all miners' positions
    are sorted together; the miners sharing a position then sit next to each other, and every sharing
    pair is read off the sorted run. Memory: one parameter's positions over all miners for plain
    tensors, one slab of ~SLAB_ENTRIES for encoded ones; time: the sort plus the sharing pairs, bounded
    per entry (`_pair_counts`).

    Beyond EXACT_MINERS miners the overlap is estimated on the positions a secret hash keeps at
    `sample_rate(m)`, the same for every miner; its key is `salt` (the validator's secret) mixed with the
    window's shards (`_window_key`), so the sample changes every window and probing it in one window
    tells nothing about the next. An overlap p over n counted positions of the smaller set has standard
    error √(p(1 − p)(1 − r)/n) (module docstring: bias and the Chebyshev tail, the guaranteed bound); at
    150m (2.1M kept positions per miner) and 256 miners, n ≈ 131k, so a 50 % overlap is read within
    ±0.4 % (3 σ) and honest overlaps (≈ 1.6 %) within ±0.1 %.
    """
    uids = sorted(index_sets)
    m = len(uids)
    rate = sample_rate(m)
    sets = [_per_param(index_sets[u]) for u in uids]
    if rate < 1.0:
        salt = _window_key(salt, sets)
    sizes = np.zeros(m, dtype=np.int64)
    common = np.zeros(m * m, dtype=np.int64)
    owner_bits = max(1, (m - 1).bit_length())
    for name in sorted({k for s in sets for k in s}):
        held = [(i, s[name]) for i, s in enumerate(sets) if name in s]
        encoded = [e for _, e in held if isinstance(e, EncodedTensor)]
        if len(encoded) == len(held) and len({e.layout for e in encoded}) == 1:
            if len(held) < 2 and rate >= 1.0:  # sampled, a lone holder's size must be sampled too
                sizes[held[0][0]] += _unique_count(held[0][1])
                continue
            _encoded_slabs(held, m, common, sizes, rate, salt)
            continue
        plain = []
        for i, idx in held:
            pos = idx.positions().reshape(-1) if isinstance(idx, EncodedTensor) else idx
            pos = _sampled(_unique_positions(name, pos), rate, salt)
            sizes[i] += pos.numel()
            if pos.numel():
                plain.append((i, pos))
        if len(plain) < 2:
            continue
        top = max(int(p[-1]) for _, p in plain)
        if top >= 1 << (62 - owner_bits):
            raise ValueError(f"positions of {name!r} too large")
        keys = np.concatenate([(p.cpu().numpy() << owner_bits) | i for i, p in plain])
        _pair_counts(keys, owner_bits, m, common)
    pairs = common.reshape(m, m)  # a < b in every counted pair (owners ascend within a run)
    common_t = torch.from_numpy((pairs + pairs.T).astype(np.float64))
    sizes_t = torch.from_numpy(sizes.astype(np.float64))
    overlap = common_t / torch.minimum(sizes_t[:, None], sizes_t[None, :]).clamp_min(1.0)
    overlap.fill_diagonal_(0.0)
    return uids, overlap


def _unique_count(enc: EncodedTensor) -> int:
    idx = enc.indices()
    if idx.shape[1] < 2 or bool((idx[:, 1:] > idx[:, :-1]).all()):
        return enc.layout.n_values
    return int(torch.unique(enc.positions().reshape(-1)).numel())


def copy_verdicts(
    index_sets: Mapping[int, IndexSet], first_seen: Mapping[int, Time], hp: GauntletHParams, salt: int = 0
) -> dict[int, CopyVerdict]:
    """Name the later of every heavily overlapping pair as the copier.

    "Later" is by `first_seen` (when the validator itself first saw the shard: a poll round or a
    time of its own clock, never the miner's). Two shards first seen at the same time cannot be
    ordered, and then neither is named the copier: punishing the original is worse than missing a
    copier, whose update still fails the memory test on its own data (stage 2, against a control).
    Overlap ≥ copy_zero_overlap zeroes the copier's positive score, ≥ copy_halve_overlap halves it.
    Every pair at or above copy_halve_overlap, ordered or not, is also listed in both verdicts' `twins`
    (stage 2 leaves copies out of each other's memory control: a copy must not make the original's
    own memory look generic).
    `salt`: the validator's secret for the position sample beyond EXACT_MINERS miners (`overlap_matrix`);
    the sample is keyed by it and the window's shards, so it is fresh every window.
    """
    missing = set(index_sets) - set(first_seen)
    if missing:
        raise ValueError(f"first-seen times missing for uids {sorted(missing)}")
    uids, overlap = overlap_matrix(index_sets, salt)
    t = torch.tensor([to_posix(first_seen[u]) for u in uids], dtype=torch.float64)
    later = t[:, None] > t[None, :]
    best, source = (overlap * later).max(dim=1) if uids else (torch.zeros(0), torch.zeros(0))
    pairs = overlap >= hp.copy_halve_overlap
    pairs.fill_diagonal_(False)
    verdicts: dict[int, CopyVerdict] = {}
    for i, uid in enumerate(uids):
        b = float(best[i])
        factor = 0.0 if b >= hp.copy_zero_overlap else 0.5 if b >= hp.copy_halve_overlap else 1.0
        copied_from = uids[int(source[i])] if b > 0 else None
        twins = [uids[j] for j in pairs[i].nonzero().flatten().tolist()]
        verdicts[uid] = CopyVerdict(overlap=min(b, 1.0), copied_from=copied_from, factor=factor, twins=twins)
    return verdicts
