"""Turning importance scores into what to keep, under a budget.

Budgets
-------
``sparsity F``     the fraction of prunable units removed: weights (unstructured) or channels (structured).
                   Units already removed by earlier masks, and (unstructured) weights already exactly zero in
                   the model (see ``live_weights``), count as removed and stay removed (nested masks).
``target_macs F``  structured only: the fraction of the dense model's MACs kept. Each channel of a group
                   is charged ``group.macs / group.size`` (a linear estimate); with ``macs_fn`` (the real
                   cost of a keep-set, e.g. ``model_cost(prune_channels(an, keep)).macs``) the selection
                   is checked against the real cost and tightened until it is met.

Scope
-----
``layer``   every layer (unstructured) or channel group (structured) loses the same fraction; each is
            ranked on its own.
``global``  one ranking over all units. Scores are first divided by the mean score of the unit's layer
            or group (over units still alive), so layers of different scale compete fairly. FairGRAPE
            pools the normalised per-group importances of all layers into one greedy run (targets from
            the pooled totals). With ``target_macs`` and ``layer`` scope every group keeps the same
            fraction, the smallest that meets the MAC budget. ``normalise=False`` skips the division
            for scores that already share one scale across layers (bi-level's mask logits, which may
            be negative, so a mean would not rescale them meaningfully).

Counts and ties
---------------
Structured keep counts go through ``round_keep``: a multiple of ``round_to`` (nearest, ties up), never 0,
never above the group's size; a group split by a Split/Slice keeps at least one channel in each part.
With a global scope the rounded counts are then adjusted block by block (removing the least important
blocks, adding back the most important ones) so the total meets the budget: for ``sparsity`` the kept
channel count is at most the target, as close as the rounding allows (exact for ``round_to`` 1).
Per layer with ``round_to`` > 1 each group's count is the rounded one, so the overall fraction is
approximate. Rankings use stable sorts: ties go to the lower index (kept first); identical inputs give
identical masks.

Order of removal
----------------
Units already dead go first, then by rank: FairGRAPE's greedy pick order (see
:mod:`onnxfair.importance.fairgrape`), or (tier, score) descending for the other criteria — the conflict
rule's protected units (tier 1) are removed only after every unprotected one.

Iterative pruning: after step t of T the sparsity is ``min(1 − keep^t, target)`` with
``keep = (1 − target)^(1/T)`` (the last step is exactly the target): the kept fraction shrinks by the
same factor each step (`sparsity_schedule`). Recompute the scores on the masked model at each step and
pass the masks: removed units stay removed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Sequence

import numpy as np

from onnxfair.errors import UsageError
from onnxfair.graph.groups import ChannelGroup
from onnxfair.graph.rewrite import round_keep
from onnxfair.importance.fairgrape import greedy_order, normalise_pool
from onnxfair.importance.order import descending_order
from onnxfair.importance.scores import Scores

__all__ = ["SCOPES", "sparsity_schedule", "select_weights", "select_channels", "rewrite_macs"]

SCOPES = ("layer", "global")


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """Sparsity after each of `steps` steps: min(1 − keep^t, target), keep = (1 − target)^(1/steps)."""
    if not 0.0 <= target < 1.0:
        raise UsageError(f"sparsity {target} is outside [0, 1)")
    if steps < 1:
        raise UsageError("the schedule needs at least one step")
    keep = (1.0 - target) ** (1.0 / steps)
    out = [min(1.0 - keep**t, target) for t in range(1, steps + 1)]
    out[-1] = target
    return out


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{name} {value} is outside [0, 1)")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r}; choose layer or global")


# ------------------------------------------------------------------------------------------- rankings


def _scalar_order(score: np.ndarray, tier: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    """`idx` (ascending) sorted most important first: tier descending, score descending, index ascending."""
    return idx[_by_tier_then_score(score[idx], tier[idx] if tier is not None else None)]


def _by_tier_then_score(score: np.ndarray, tier: np.ndarray | None) -> np.ndarray:
    """Positions by tier descending, score descending, position ascending (exact; a radix sort, not lexsort)."""
    order = descending_order(score)
    if tier is not None and tier.size and tier.min() != tier.max():
        order = order[np.argsort(-tier[order].astype(np.int64), kind="stable")]
    return order


def _normalised(score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    mean = float(score[idx].mean()) if idx.size else 0.0
    return score / mean if mean > 0 else score


def _pooled_order(units: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], per_group: bool, n_needed: int,
                  normalise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One ranking over several layers. `units`: (scores, alive flat indices, tiers) per layer, scores
    flat ([n] or [K, n]). Returns (layer number, flat index) arrays of the `n_needed` most important
    units (fewer when fewer are alive), most important first. `normalise` divides scalar scores by their layer's mean."""
    layer_ids, flat = [], []
    if per_group:
        blocks = []
        for l, (sc, idx, _t) in enumerate(units):
            blocks.append(normalise_pool(sc[:, idx]))
            layer_ids.append(np.full(idx.size, l, np.int64))
            flat.append(idx)
        pool = np.concatenate(blocks, axis=1)
        lid, fl = np.concatenate(layer_ids), np.concatenate(flat)
        o = greedy_order(pool, min(n_needed, pool.shape[1]))
        return lid[o], fl[o]
    keys_s, keys_t = [], []
    tiered = any(tr is not None for _s, _i, tr in units)
    for l, (sc, idx, tr) in enumerate(units):
        keys_s.append((_normalised(sc, idx) if normalise else sc)[idx])
        if tiered:
            keys_t.append(tr[idx].astype(np.int64) if tr is not None else np.zeros(idx.size, np.int64))
        layer_ids.append(np.full(idx.size, l, np.int64))
        flat.append(idx)
    # positions in the concatenation follow (layer, index), so position order breaks score ties
    o = _by_tier_then_score(np.concatenate(keys_s), np.concatenate(keys_t) if tiered else None)[:n_needed]
    lid, fl = np.concatenate(layer_ids), np.concatenate(flat)
    return lid[o], fl[o]


def _layer_order(sc: np.ndarray, idx: np.ndarray | None, tr: np.ndarray | None, per_group: bool,
                 n_needed: int) -> np.ndarray:
    """The layer's alive units (`idx`, or None when all are alive: ranked as they are, no gathered copy),
    most important first."""
    if per_group:
        if idx is None:
            return greedy_order(sc, min(n_needed, sc.shape[1]))
        return idx[greedy_order(sc[:, idx], min(n_needed, idx.size))]
    return _by_tier_then_score(sc, tr) if idx is None else _scalar_order(sc, tr, idx)


# -------------------------------------------------------------------------------------------- weights


def select_weights(
    scores: Scores, sparsity: float, scope: str = "layer", *, normalise: bool = True, threads: int = 1
) -> dict[str, np.ndarray]:
    """Unstructured masks (float32 0/1, the initializer's shape) for every scored initializer.

    normalise   global scope: divide each layer's scores by their mean first (see the module docstring)
    threads     layer scope: rank this many layers at once (the rankings are independent and release the
                GIL: sorting, and FairGRAPE's compiled greedy), same masks for any count
    """
    _check_fraction("sparsity", sparsity)
    _check_scope(scope)
    names = list(scores.weights)
    K = len(scores.group_labels) if scores.per_group else 0
    flat_scores, alive_idx, tiers, sizes = [], [], [], []
    for n in names:
        sc = np.asarray(scores.weights[n], dtype=np.float64)
        sc = sc.reshape(K, -1) if scores.per_group else sc.reshape(-1)
        alive = np.asarray(scores.weight_alive[n], dtype=bool).reshape(-1)
        flat_scores.append(sc)
        alive_idx.append(None if alive.all() else np.flatnonzero(alive))
        tr = scores.weight_tier[n].reshape(-1) if scores.weight_tier else None
        tiers.append(tr)
        sizes.append(alive.size)
    masks = {n: np.zeros(scores.weight_alive[n].shape, np.float32) for n in names}
    if scope == "layer":
        def kept(i: int) -> np.ndarray:
            idx, size = alive_idx[i], sizes[i]
            n_keep = min(size - int(round(sparsity * size)), size if idx is None else idx.size)
            return _layer_order(flat_scores[i], idx, tiers[i], scores.per_group, n_keep)[:n_keep]

        largest_first = sorted(range(len(names)), key=lambda i: -sizes[i])  # balances the threads' loads
        if threads > 1 and len(names) > 1:
            with ThreadPoolExecutor(threads) as pool:
                keeps = dict(zip(largest_first, pool.map(kept, largest_first)))
        else:
            keeps = {i: kept(i) for i in largest_first}
        for i, n in enumerate(names):
            masks[n].reshape(-1)[keeps[i]] = 1.0
        return masks
    alive_idx = [np.arange(size) if idx is None else idx for idx, size in zip(alive_idx, sizes)]
    total = sum(sizes)
    n_keep = min(total - int(round(sparsity * total)), sum(i.size for i in alive_idx))
    lid, fl = _pooled_order(list(zip(flat_scores, alive_idx, tiers)), scores.per_group, n_keep, normalise)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    kept_all = np.zeros(total, np.float32)  # every layer's mask in one buffer: one scatter, not one pass per layer
    kept_all[starts[lid[:n_keep]] + fl[:n_keep]] = 1.0
    return {n: kept_all[a : a + size].reshape(masks[n].shape) for n, a, size in zip(names, starts, sizes)}


# ------------------------------------------------------------------------------------------- channels


class _Group:
    """Per-group selection state: alive channels, ranking, allowed keep counts."""

    def __init__(self, g: ChannelGroup, alive: np.ndarray, round_to: int, floor: int = 1):
        self.g = g
        self.alive_idx = np.flatnonzero(alive)
        self.n_alive = int(self.alive_idx.size)
        parts = [(lo, hi) for lo, hi in (g.parts or []) if alive[lo:hi].any()]
        self.parts = parts
        self.min_keep = min(max(1, len(parts), int(floor)), self.n_alive)
        self.round_to = max(int(round_to), 1)
        self.order: np.ndarray = self.alive_idx  # most important first; set by the caller

    def allowed(self) -> np.ndarray:
        """Keep counts the rounding allows: multiples of round_to (at least round_to) up to the alive
        count, and the alive count itself; every count for groups no larger than round_to."""
        lo, hi = self.min_keep, self.n_alive
        if self.round_to <= 1 or self.g.size <= self.round_to:
            return np.arange(lo, hi + 1, dtype=np.int64)
        first = max(self.round_to, -(-lo // self.round_to) * self.round_to)
        mult = np.arange(first, hi + 1, self.round_to, dtype=np.int64)
        return np.unique(np.concatenate([mult, np.array([hi], np.int64)]))

    def rounded(self, ideal: float) -> int:
        k = round_keep(int(round(ideal)), self.g.size, self.round_to)
        vals = self.allowed()
        if k in vals:
            return int(k)
        return int(vals[np.argmin(np.abs(vals - k))])

    def kept(self, k: int) -> np.ndarray:
        """The k most important alive channels, with at least one in every Split/Slice part."""
        keep = list(self.order[:k])
        if self.parts:
            for lo, hi in self.parts:
                if any(lo <= c < hi for c in keep):
                    continue
                best = next(c for c in self.order if lo <= c < hi)
                for pos in range(len(keep) - 1, -1, -1):
                    c = keep[pos]
                    mates = [d for d in keep if self._part(d) == self._part(c)]
                    if self._part(c) is None or len(mates) > 1:
                        keep.pop(pos)
                        break
                keep.append(best)
        return np.sort(np.asarray(keep, dtype=np.int64))

    def _part(self, c: int):
        for p in self.parts:
            if p[0] <= c < p[1]:
                return p
        return None


def _fit_counts(gs: list[_Group], counts: list[int], cost: np.ndarray, limit: float,
                rank: list[np.ndarray]) -> list[int]:
    """Adjust rounded counts so Σ cost·count <= limit: drop the least important blocks, then add back
    the most important blocks that still fit. `rank[l][j]` is the global position of group l's j-th
    channel (smaller = more important)."""
    counts = list(counts)

    def total() -> float:
        return float(sum(c * k for c, k in zip(cost, counts)))

    while total() > limit + 1e-9:
        best, best_key = None, None
        for l, gr in enumerate(gs):
            vals = gr.allowed()
            lower = vals[vals < counts[l]]
            if not lower.size:
                continue
            k_new = int(lower.max())
            key = float(rank[l][k_new:counts[l]].min())  # the block's most important channel
            if best_key is None or key > best_key:
                best, best_key = (l, k_new), key
        if best is None:
            break
        counts[best[0]] = best[1]
    while True:
        best, best_key = None, None
        for l, gr in enumerate(gs):
            vals = gr.allowed()
            higher = vals[vals > counts[l]]
            if not higher.size:
                continue
            k_new = int(higher.min())
            if total() + cost[l] * (k_new - counts[l]) > limit + 1e-9:
                continue
            key = float(rank[l][counts[l]:k_new].max())  # the block's least important channel
            if best_key is None or key < best_key:
                best, best_key = (l, k_new), key
        if best is None:
            break
        counts[best[0]] = best[1]
    return counts


def select_channels(
    scores: Scores,
    groups: Sequence[ChannelGroup],
    *,
    sparsity: float | None = None,
    target_macs: float | None = None,
    scope: str = "layer",
    round_to: int = 1,
    keep_prev: Mapping[int, np.ndarray] | None = None,
    macs_fn: Callable[[dict[int, np.ndarray]], float] | None = None,
    dense_macs: float | None = None,
    normalise: bool = True,
    floors: Mapping[int, int] | None = None,
) -> dict[int, np.ndarray]:
    """Kept channel indices (sorted int64) for every group, under one budget (see the module docstring).

    keep_prev   an earlier step's keep-sets: channels outside them stay removed (as do channels the
                masks the scores were computed under already removed)
    macs_fn     the real MACs of a keep-set, used to check and tighten a target_macs selection
    dense_macs  the dense model's MACs (default: derived from the groups' macs / macs_share)
    normalise   global scope: divide each group's scores by their mean first (see the module docstring)
    floors      the fewest channels each group id may keep (an iterative schedule's later selection)
    """
    if (sparsity is None) == (target_macs is None):
        raise UsageError("give exactly one budget: sparsity (fraction removed) or target_macs (fraction of MACs kept)")
    _check_scope(scope)
    if sparsity is not None:
        _check_fraction("sparsity", sparsity)
    else:
        if not 0.0 < target_macs <= 1.0:
            raise UsageError(f"target_macs {target_macs} is outside (0, 1]")
    if round_to < 1:
        raise UsageError("round_to must be at least 1")
    groups = list(groups)
    gs: list[_Group] = []
    for g in groups:
        if g.id not in scores.channels:
            raise UsageError(f"no scores for channel group {g.id} ({g.name}); score with the same groups")
        alive = np.asarray(scores.channel_alive.get(g.id, np.ones(g.size, bool)), dtype=bool).copy()
        if keep_prev is not None and g.id in keep_prev:
            prev = np.zeros(g.size, bool)
            prev[np.asarray(keep_prev[g.id], dtype=np.int64)] = True
            alive &= prev
        if not alive.any():
            raise UsageError(f"channel group {g.name} has no channel left to keep")
        gs.append(_Group(g, alive, round_to, (floors or {}).get(g.id, 1)))

    per_group = scores.per_group
    tiers = scores.channel_tier or {}
    units = [(np.asarray(scores.channels[gr.g.id], dtype=np.float64), gr.alive_idx, tiers.get(gr.g.id)) for gr in gs]
    if scope == "layer":
        for gr, (sc, idx, tr) in zip(gs, units):
            gr.order = _layer_order(sc, idx, tr, per_group, idx.size)
        rank = None
    else:
        lid, fl = _pooled_order(units, per_group, sum(gr.n_alive for gr in gs), normalise)
        rank = []
        for l, gr in enumerate(gs):
            gr.order = fl[lid == l]
            rank.append(np.flatnonzero(lid == l).astype(np.float64))

    if sparsity is not None:
        if scope == "layer":
            counts = [gr.rounded(min(gr.g.size - int(round(sparsity * gr.g.size)), gr.n_alive)) for gr in gs]
        else:
            total = sum(gr.g.size for gr in gs)
            limit = min(total - int(round(sparsity * total)), int(lid.size))
            ideal = np.bincount(lid[:limit], minlength=len(gs))
            counts = [gr.rounded(k) for gr, k in zip(gs, ideal)]
            counts = _fit_counts(gs, counts, np.ones(len(gs)), float(limit), rank)
        return {gr.g.id: gr.kept(k) for gr, k in zip(gs, counts)}
    return _select_macs(gs, target_macs, scope, rank, lid if scope == "global" else None, macs_fn, dense_macs)


def rewrite_macs(an) -> Callable[[dict[int, np.ndarray]], float]:
    """The real MACs of a keep-set for `select_channels(macs_fn=...)`: rewrite the model and count."""
    from onnxfair.graph import model_cost, prune_channels

    def macs(keep: dict[int, np.ndarray]) -> float:
        return float(model_cost(prune_channels(an, keep), an.input_shapes or None).macs)

    return macs


def _dense_total(gs: list[_Group], dense_macs: float | None) -> float:
    if dense_macs is not None:
        return float(dense_macs)
    for gr in gs:
        if gr.g.macs_share > 0 and gr.g.macs > 0:
            return float(gr.g.macs) / float(gr.g.macs_share)
    raise UsageError("the channel groups carry no MAC counts; pass dense_macs (or give input shapes)")


def _select_macs(gs, target, scope, rank, lid, macs_fn, dense_macs) -> dict[int, np.ndarray]:
    total = _dense_total(gs, dense_macs)
    cost = np.array([gr.g.macs / gr.g.size for gr in gs], dtype=np.float64)
    goal = target * total
    fixed = total - float(sum(c * gr.g.size for c, gr in zip(cost, gs)))  # MACs no group accounts for

    def estimate(counts) -> float:
        return fixed + float(sum(c * k for c, k in zip(cost, counts)))

    def keep_of(counts) -> dict[int, np.ndarray]:
        return {gr.g.id: gr.kept(k) for gr, k in zip(gs, counts)}

    measured_at: dict[tuple, float] = {}  # the real cost of each distinct selection, measured once

    def real(counts) -> float:
        key = tuple(counts)
        if key not in measured_at:
            measured_at[key] = float(macs_fn(keep_of(counts))) if macs_fn is not None else estimate(counts)
        return measured_at[key]

    if scope == "layer":
        def counts_at(f: float) -> list[int]:
            return [gr.rounded(min(gr.g.size * (1.0 - f), gr.n_alive)) for gr in gs]

        def smallest_fraction(measure, lo: float, hi: float, iters: int) -> float:
            """The smallest fraction in [lo, hi] whose counts meet the goal (hi is taken to meet it)."""
            if measure(counts_at(lo)) <= goal:
                return lo
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                if measure(counts_at(mid)) <= goal:
                    hi = mid
                else:
                    lo = mid
            return hi

        f = smallest_fraction(estimate, 0.0, 1.0, 40)
        if macs_fn is not None:  # the per-channel estimate is linear; a layer whose input and output channels
            # are both pruned costs less than it says, so the real cost may sit well under the goal: search on it
            under = real(counts_at(f)) <= goal
            f = smallest_fraction(real, 0.0, f, 16) if under else smallest_fraction(real, f, 1.0, 16)
        counts = counts_at(f)
        measured = real(counts)
        _check_met(measured, goal, total, target, gs)
        return keep_of(counts)

    order_cost = cost[lid]
    prefix = np.cumsum(order_cost)

    def select_at(limit: float) -> tuple[list[int], float]:
        n = int(np.searchsorted(prefix, limit + 1e-9, side="right"))
        ideal = np.bincount(lid[:n], minlength=len(gs))
        counts = _fit_counts(gs, [gr.rounded(k) for gr, k in zip(gs, ideal)], cost, limit, rank)
        return counts, real(counts)

    limit = goal - fixed
    fewest = [int(gr.allowed()[0]) for gr in gs]  # the fewest channels each group may keep, rounding included
    floor = float(sum(c * k for c, k in zip(cost, fewest)))
    overshot = None  # the last limit whose selection kept more MACs than the goal
    # the smallest change a selection can make: one rounding block of the cheapest group
    block = min(float(c) * gr.round_to for c, gr in zip(cost, gs))
    for attempt in range(30):
        counts, measured = select_at(limit)
        if measured <= goal + 1e-9 or macs_fn is None:
            break
        overshot = limit
        # step down by the overshoot, and by at least a growing number of blocks so the selection changes
        limit -= max(measured - goal, block * 2**attempt)
        if limit < floor:
            limit = floor
            counts = fewest
            measured = real(counts)
            break
    if overshot is None and macs_fn is not None and goal - measured > block:
        # the linear estimate can undercount what removing coupled channels saves (a layer loses input and
        # output channels at once), landing under the goal: raise the limit until a selection overshoots
        step = max(goal - measured, block)
        for _ in range(30):
            if limit >= prefix[-1]:
                break
            c, m = select_at(limit + step)
            if m > goal + 1e-9:
                overshot = limit + step
                break
            limit += step
            if m > measured:
                counts, measured = c, m
            step *= 2
    if overshot is not None and measured <= goal + 1e-9:
        # the step-downs (or ups) can land well under the goal: bisect towards the last limit that
        # overshot, keeping the feasible selection that keeps the most MACs
        for _ in range(12):
            if overshot - limit < float(cost.min()):  # no channel left to add or drop in between
                break
            mid = 0.5 * (limit + overshot)
            c, m = select_at(mid)
            if m <= goal + 1e-9:
                limit = mid
                if m > measured:
                    counts, measured = c, m
            else:
                overshot = mid
    if macs_fn is not None and measured <= goal + 1e-9:
        counts, measured = _top_up(gs, counts, measured, rank, real, goal)
    _check_met(measured, goal, total, target, gs)
    return keep_of(counts)


def _top_up(gs: list[_Group], counts: list[int], measured: float, rank: list[np.ndarray],
            real: Callable[[list[int]], float], goal: float) -> tuple[list[int], float]:
    """Add back the most important next block that still fits the goal, measured for real, until none fits.

    The ranking-prefix selection stops at the first block that does not fit, often an expensive one (a
    channel feeding a wide layer), and so lands under the goal (the Adult MLP at 0.5, one channel at a time:
    0.4946 where 0.4978 fits); cheaper blocks further down the ranking may still fit. A group's block that overshot
    once is not tried again: adding channels elsewhere only raises what each block costs.
    """
    too_costly: set[int] = set()
    for _ in range(max(64, 4 * len(gs))):  # each try adds a block or rules a group out; the cap bounds the rewrites
        best, best_key = None, None
        for l, gr in enumerate(gs):
            higher = gr.allowed()
            higher = higher[higher > counts[l]]
            if l in too_costly or not higher.size:
                continue
            k_new = int(higher.min())
            key = float(rank[l][counts[l]:k_new].max())  # the block's least important channel
            if best_key is None or key < best_key:
                best, best_key = (l, k_new), key
        if best is None:
            break
        trial = list(counts)
        trial[best[0]] = best[1]
        m = real(trial)
        if m <= goal + 1e-9:
            counts, measured = trial, m
        else:
            too_costly.add(best[0])
    return counts, measured


def _check_met(macs: float, goal: float, total: float, target: float, gs: list[_Group]) -> None:
    if macs > goal * (1 + 1e-9) + 1e-9:
        rounded = any(1 < g.round_to < g.g.size for g in gs)  # a group no larger than it is counted in ones
        floor = "frozen layers and --round-to set the floor" if rounded else "frozen layers and the one channel each group keeps set the floor"
        raise UsageError(f"--target-macs {target} cannot be met: keeping the fewest channels allowed still leaves "
                         f"{macs / total:.3f} of the MACs ({floor}); raise the target"
                         + (" or lower --round-to" if rounded else ""))
