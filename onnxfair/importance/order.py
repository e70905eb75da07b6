"""Exact descending orders of float scores, fast: every ranking in selection goes through here.

Rankings must be exact (ties by index, so identical inputs give identical masks) and cheap on tens of
millions of weights, where numpy's lexsort takes seconds.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["descending_order"]


def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices of `values` (no NaN) by descending value, ties by ascending index (-0.0 ties with 0.0).

    The bit patterns of floats order like the numbers (negative ones once their magnitude bits are
    flipped), and torch's stable integer sort (a radix sort) orders them fastest: about 3x numpy's merge
    sort on int64 keys, and int32 keys again 3x faster than int64. So the sort runs on the float32
    rounding of the values, which keeps their order except that distinct doubles may round to one
    float32; those runs (up to a few percent of the units, on millions of heavy-tailed scores) are then
    put in order by the doubles."""
    v = np.asarray(values, dtype=np.float64).ravel() + 0.0  # + 0.0: -0.0 -> 0.0
    lowest = v.min() if v.size else 0.0
    if np.isnan(lowest):
        raise ValueError("cannot rank NaN scores")
    if v.size < 4096:
        return np.argsort(-v, kind="stable")
    keys = _float32_keys(v, negative=bool(lowest < 0))
    neg_sorted, order = torch.sort(torch.from_numpy(keys).neg_(), stable=True)
    return _order_float32_ties(v, neg_sorted.numpy(), order.numpy())


def _float32_keys(v: np.ndarray, negative: bool) -> np.ndarray:
    """int32 keys of the float32 roundings, monotone: a > b implies key(a) >= key(b). `negative`: some
    values are below zero."""
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, still in order
        f = np.asarray(v).astype(np.float32)
    f += np.float32(0.0)  # -0.0 -> 0.0: equal values, equal keys
    keys = f.view(np.int32)
    if negative:  # sign-magnitude: flip the magnitude bits of negative floats to order them
        keys = keys ^ ((keys >> 31) & np.int32(0x7FFFFFFF))
    return keys


def _order_float32_ties(v: np.ndarray, sorted_keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Within each run of equal float32 keys in `order` (`sorted_keys`: the keys in that order, or any
    one-to-one function of them), order by the doubles (descending), then index. Sorts the tied
    positions only (a few percent of them at most)."""
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])  # position j ties with j + 1
    if not same.size:
        return order
    in_run = np.zeros(order.size, dtype=bool)
    in_run[same] = True
    in_run[same + 1] = True
    pos = np.flatnonzero(in_run)  # every position inside a run, ascending
    starts = np.ones(pos.size, dtype=bool)
    starts[1:] = pos[1:] - 1 != pos[:-1]  # a gap begins a run
    starts[1:] |= sorted_keys[pos[1:]] != sorted_keys[pos[1:] - 1]  # so does a new key right after a run
    run = np.cumsum(starts)
    idx = order[pos]
    order[pos] = idx[np.lexsort((idx, -v[idx], run))]
    return order
