"""FairGRAPE's greedy share-keeping selection (Lin et al., ECCV 2022), exact and fast.

The rule, for one pool of n units (a layer's weights, a channel group's channels, or the global pool)
with importances ``I[g, u] >= 0`` for K demographic groups:

    T_g = Σ_u I[g, u];  t_g = T_g / Σ_h T_h                          target share of each group
    S = ∅;  R = 0 (K totals);  p_g = 1/K
    repeat until |S| = n_keep:
        g* = argmin_g (p_g − t_g)                 (the lowest g on ties)
        u  = g*'s most important unit not in S    (the lowest index on ties)
        S ← S ∪ {u};  R ← R + I[:, u]             (every group's running total, in pick order)
        s = R_0 + R_1 + … (left to right);  p = R / s  (p = 1/K while s = 0)

Groups whose total T_g is 0 in the pool take no part (they have no share to keep: K counts the others);
if no group has any importance the units are taken in index order. The pick order is itself a ranking:
the set after n picks is the first n picks, so selection code can run the greedy once and cut anywhere.

Speed. The reference implementation runs this loop per weight with tensor indexing (about 25 µs per kept
weight here: 2.5 minutes for half of ResNet-18, hours for a ResNet-34). The loop cannot be vectorised
exactly (runs of consecutive picks by one group are 1.1–1.4 long on realistic importances, and batching
with verification confirms too few picks per attempt for K >= 3), so it is compiled with numba
(`greedy_kernel`): each group's list sorted as far as the greedy can read it (n_keep units), then about
0.1 µs per pick, the same picks bit for bit.

`order_reference` is the straightforward loop kept for checking (tests compare the two).
"""

from __future__ import annotations

import numpy as np
import torch

from onnxfair.importance.order import descending_order

__all__ = ["share_targets", "greedy_order", "order_reference", "normalise_pool"]

_SAMPLE = 32768  # values sampled to place a head's cut: the count above it is within 5 % in all but ~1e-3 of pools


def share_targets(importance: np.ndarray) -> np.ndarray:
    """t_g = T_g / Σ T over the pool (zeros when the pool has no importance at all)."""
    return _shares(np.asarray(importance, dtype=np.float64).sum(axis=1))


def _shares(totals: np.ndarray) -> np.ndarray:
    total = totals.sum()
    return totals / total if total > 0 else np.zeros_like(totals)


def normalise_pool(importance: np.ndarray) -> np.ndarray:
    """Divide a layer's [K, n] importances by its mean per-unit total, so layers can share one pool."""
    imp = np.asarray(importance, dtype=np.float64)
    mean = imp.sum(axis=0).mean() if imp.shape[1] else 0.0
    return imp / mean if mean > 0 else imp


def _sorted_lists(imp: np.ndarray) -> list[np.ndarray]:
    return [descending_order(imp[g]) for g in range(imp.shape[0])]


def _prepare(importance: np.ndarray, n_keep: int) -> tuple[np.ndarray, int, np.ndarray | None, np.ndarray]:
    """Checked float64 importances of the groups that take part, n_keep clipped to the pool, the picks
    when the rule is trivial (else None), and the target shares."""
    imp = np.asarray(importance, dtype=np.float64)
    if imp.ndim != 2:
        raise ValueError("importance must be [groups, units]")
    # two reductions instead of full-size boolean temporaries: a NaN or an infinity makes its row's total
    # NaN or infinite (so does a total past the double range, which the shares could not use either)
    totals = imp.sum(axis=1)
    if imp.size and not (np.isfinite(totals).all() and imp.min() >= 0.0):
        raise ValueError("importances must be finite and non-negative")
    n = imp.shape[1]
    n_keep = int(min(max(n_keep, 0), n))
    active = totals > 0
    if not active.any():
        return imp, n_keep, np.arange(n_keep, dtype=np.int64), np.zeros_like(totals)
    if active.all():
        return imp, n_keep, None, _shares(totals)
    imp = imp[active]  # totals again from the copy, so the reference loop (which re-prepares it) agrees to the bit
    return imp, n_keep, None, _shares(imp.sum(axis=1))


def order_reference(importance: np.ndarray, n_keep: int) -> np.ndarray:
    """The rule written as plainly as possible: one pick per iteration, numpy arithmetic."""
    imp, n_keep, trivial, t = _prepare(importance, n_keep)
    if trivial is not None:
        return trivial
    K, n = imp.shape
    lists = _sorted_lists(imp)
    taken = np.zeros(n, dtype=bool)
    ptr = [0] * K
    R = np.zeros(K)
    p = np.full(K, 1.0 / K)
    out = []
    while len(out) < n_keep:
        g = int(np.argmin(p - t))
        while taken[lists[g][ptr[g]]]:
            ptr[g] += 1
        u = int(lists[g][ptr[g]])
        taken[u] = True
        out.append(u)
        R = R + imp[:, u]
        s = 0.0
        for r in R:
            s += r
        p = R / s if s > 0 else np.full(K, 1.0 / K)
    return np.asarray(out, dtype=np.int64)


def greedy_order(importance: np.ndarray, n_keep: int, method: str = "compiled") -> np.ndarray:
    """The first `n_keep` picks of the greedy share-keeping rule (unit indices, in pick order).

    `importance` is [K, n] (K demographic groups, n units). `method`: "compiled" (the default) or
    "reference" (the plain numpy loop, for checking).
    """
    if method not in ("compiled", "reference"):
        raise ValueError(f"unknown method {method!r}")
    imp, n_keep, trivial, t = _prepare(importance, n_keep)
    if trivial is not None:
        return trivial
    if method == "reference":
        return order_reference(imp, n_keep)
    if imp.shape[0] == 1:
        return _sorted_lists(imp)[0][:n_keep].astype(np.int64)
    return _order_compiled(imp, n_keep, t)


# ------------------------------------------------------------------------------------- compiled loop


def _sorted_heads(imp: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group's first `depth` units by descending importance (more where ties straddle the cut; every
    unit when depth >= n), exactly the head of its full sorted list: [K, max length] padded, and lengths.

    A head of n_keep units is always enough: every unit a group's pointer has passed is taken (by that
    group or another), so no pointer passes more than the n_keep units kept. Sorting only the head saves
    much of the sorting, which otherwise costs more than the picks (a tenth of it when a tenth is kept)."""
    K, n = imp.shape
    if depth >= n:
        return np.stack(_sorted_lists(imp)), np.full(K, n, dtype=np.int64)
    members = [_head_members(imp[g], depth) for g in range(K)]
    lengths = np.array([m.size for m, _ in members], dtype=np.int64)
    lists = np.empty((K, int(lengths.max())), dtype=np.int64)  # the padding past a head is never read
    for g, (m, v) in enumerate(members):
        np.take(m, descending_order(v), out=lists[g, : m.size])
    return lists, lengths


def _head_members(values: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ascending) and values of every unit whose value is at or above a cut that leaves at least
    `depth` of them: a superset of the `depth` largest, all ties with the cut included, so sorting these
    gives an exact head. The cut comes from a strided sample of the values (a cheap quantile, set 5 % low);
    when the sample misleads and too few units clear it, the exact depth-th largest is found instead.
    (-0.0 compares equal to 0.0, so it ties with a cut at zero.)"""
    from onnxfair.importance.greedy_kernel import at_or_above

    values = np.ascontiguousarray(values)
    n = values.size
    sample = values[:: max(1, n // _SAMPLE)]
    want = int(np.ceil(depth / n * sample.size * 1.05)) + 16
    if want < sample.size:
        cut = np.partition(sample, sample.size - want)[sample.size - want]
        room = min(n, int(want / sample.size * n * 1.25) + 1024)  # about the count the sample promises
    else:
        cut = torch.kthvalue(torch.from_numpy(values), n - depth + 1).values.item()
        room = n
    for attempt in range(3):
        index, kept = np.empty(room, dtype=np.int64), np.empty(room)
        c = at_or_above(values, cut, index, kept)
        if c < depth:  # the sample misled: the exact cut
            cut = torch.kthvalue(torch.from_numpy(values), n - depth + 1).values.item()
        elif c > room:  # more than the room left: again with room for all
            room = c
        else:
            return index[:c], kept[:c]
    raise AssertionError("unreachable: the exact cut leaves at least depth units")


def _order_compiled(imp: np.ndarray, n_keep: int, t: np.ndarray) -> np.ndarray:
    from onnxfair.importance.greedy_kernel import greedy_picks

    lists, lengths = _sorted_heads(imp, max(n_keep, 1))
    # the kernel reads the importance rows of the units it takes: from a unit-major copy when many are
    # taken, straight from the [K, n] rows when few are (the copy, a pass over every weight, then costs
    # more than the scattered reads it saves: break-even measured near a fifth kept)
    unit_major = 5 * n_keep >= imp.shape[1]
    rows = np.ascontiguousarray(imp.T) if unit_major else np.ascontiguousarray(imp)
    out = greedy_picks(n_keep, lists, lengths, rows, t, unit_major)
    if out.size != n_keep:  # cannot happen (see _sorted_heads); the kernel checks rather than read past a head
        raise RuntimeError(f"greedy selection stopped after {out.size} of {n_keep} picks")
    return out
