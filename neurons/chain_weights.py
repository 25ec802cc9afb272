"""Fit a validator's weights to the subnet's weight rules before they go on chain.

The Gauntlet (gauntlet/weights.py) decides who earned what; this module only makes that vector one the
chain accepts, without paying anyone more than the chain forces. Rules and names are subtensor's
(`pallets/subtensor/src/subnets/weights.rs`, `do_set_weights`), values are read from the subnet
(`Chain.weight_rules`):

- **MinAllowedWeights** (`check_length` → `WeightVecLengthIsLow`): a vector needs at least
  min(MinAllowedWeights, n) non-zero entries (n = registered uids). Missing entries are filled, in this
  order, with (1) the validator's own uid — Yuma masks the diagonal (`inplace_mask_diag` in the epoch), so
  a self-weight pays nobody — then (2) uids that earned nothing, in uid order, each with the smallest u16
  step: max/65535 before the SDK's max-upscaling, i.e. exactly 1 in the stored u16 vector. A filler thus
  carries 1/65535 of the largest weight; after Yuma's stake-weighted median its incentive is at most that.
- **MaxWeightsLimit** (`max_weight_limited` → `MaxWeightExceeded`): no entry may exceed
  MaxWeightsLimit/65535 of the vector's sum. Earners above the cap are cut to it and the excess goes to
  the other earners in proportion (water-filling). When the earners cannot absorb it all (k earners,
  k·cap < 1), the rest goes to the own uid (pays nobody), then, only if the limit still binds, evenly
  over zero-score uids — the one case where a non-earner gets more than one step, and only because the
  chain refuses anything else.
  If even n equal shares exceed the limit (MaxWeightsLimit · n < 65535, e.g. a limit of 0), no vector but
  a lone self-weight passes the check (it is exempt); the validator then sends that, which pays nobody.
- uids whose hotkey changed since scoring (`changed`) get nothing and are used as fillers only when no
  other uid is left.

`conform_weights` is pure; the SDK's `SetWeights` then quantises (max-upscale to u16, zeros dropped) and
preflights the same rules, so what is sent is what the chain stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from transport.chain import WeightRules

U16_MAX = 65535
CAP_MARGIN = 0.995  # below the limit, so u16 rounding cannot push the largest share over it


@dataclass(frozen=True)
class Conformed:
    uids: list[int]
    weights: list[float]
    fillers: list[int]  # uids in the vector only because MinAllowedWeights/MaxWeightsLimit force it
    dropped: list[int]  # earners left out: uid changed hands, or out of range


def _water_fill(shares: dict[int, float], cap: float) -> dict[int, float]:
    """Cut shares above `cap` to it, giving the excess to the others in proportion, until none exceeds it."""
    out = dict(shares)
    while True:
        over = {u for u, s in out.items() if s > cap}
        if not over:
            return out
        excess = sum(out[u] - cap for u in over)
        for u in over:
            out[u] = cap
        free = {u: s for u, s in out.items() if s < cap}
        room = sum(free.values())
        if not free or room <= 0:
            return out  # every earner at the cap: the caller places the rest
        for u, s in free.items():
            out[u] = s + excess * s / room


def conform_weights(weights: Mapping[int, float], rules: WeightRules, own_uid: int | None,
                    changed: Iterable[int] = ()) -> Conformed:
    """The (uids, weights) to send: earners' shares capped, padded to the minimum count (see module doc)."""
    n = rules.n
    changed = set(changed)
    earned = {u: float(w) for u, w in weights.items() if w > 0}
    dropped = sorted(u for u in earned if u in changed or not 0 <= u < n or u == own_uid)
    shares = {u: w for u, w in earned.items() if u not in dropped}
    total = sum(shares.values())
    if total <= 0:
        return Conformed([], [], [], dropped)
    shares = {u: w / total for u, w in shares.items()}
    if rules.max_weights_limit * n < U16_MAX:  # even n equal shares exceed the limit: only a self-weight passes
        return Conformed([own_uid], [1.0], [own_uid], dropped) if own_uid is not None and 0 <= own_uid < n \
            else Conformed([], [], [], dropped)
    limit = min(rules.max_weights_limit, U16_MAX) / U16_MAX
    cap = limit * CAP_MARGIN if limit < 1 else 1.0
    if cap < 1:
        shares = _water_fill(shares, cap)
    rest = max(0.0, 1.0 - sum(shares.values()))
    fillers: list[int] = []
    order = ([own_uid] if own_uid is not None and 0 <= own_uid < n else []) + [
        u for u in range(n) if u != own_uid and u not in shares and u not in changed
    ] + sorted(u for u in changed if 0 <= u < n and u != own_uid and u not in shares)
    pool = iter(order)
    # The rest the earners could not take under the cap: own uid first, then zero-score uids, each ≤ cap.
    while rest > 1e-12:
        u = next(pool, None)
        if u is None:
            break
        take = min(cap, rest)
        shares[u] = take
        fillers.append(u)
        rest -= take
    need = min(rules.min_allowed_weights, n) - len(shares)
    if need > 0:
        step = max(shares.values()) / U16_MAX  # one u16 step after the SDK's max-upscaling
        for u in pool:
            if need <= 0:
                break
            shares[u] = step
            fillers.append(u)
            need -= 1
    uids = sorted(shares)
    return Conformed(uids, [shares[u] for u in uids], fillers, dropped)
