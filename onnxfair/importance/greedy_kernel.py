"""The FairGRAPE greedy pick loop, compiled with numba.

The loop is inherently sequential (each pick moves every group's share, which decides the next pick), so
it is compiled rather than vectorised: about 0.1 µs per pick against 1–3 µs for the tightest pure-Python
loop and about 25 µs for the published per-weight loop. Imported lazily: numba's import and the first
compilation (about a second, cached on disk where the package folder or the user cache is writable) are
paid only by runs that use FairGRAPE.

The arithmetic is the reference rule's, operation for operation (`fairgrape.order_reference`): R += the
unit's importance row, s = R_0 + R_1 + … left to right, p = R / s, g* = the first argmin of p − t. numba
compiles without fast-math, so the picks are the reference's bit for bit (the tests compare them).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_BLOCK = 256  # free candidates per group whose importance rows are fetched together


def _jit(fn):
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location: compile per process instead
        return njit(nogil=True)(fn)


@_jit
def at_or_above(values: np.ndarray, cut: float, index: np.ndarray, kept: np.ndarray) -> int:
    """How many of `values` are >= `cut`. The indices (ascending) and values of the first len(index) of
    them go to `index` and `kept`. One pass with no branch on the comparison (it mispredicts on
    heavy-tailed scores): about half the time of numpy's mask, flatnonzero and gather."""
    c = 0
    room = index.size
    for i in range(values.size):
        x = values[i]
        if c < room:
            index[c] = i
            kept[c] = x
        c += x >= cut
    return c


@njit(inline="always")
def _is_taken(taken: np.ndarray, u: int) -> bool:
    return (taken[u >> 6] >> np.uint64(u & 63)) & np.uint64(1) != 0


@njit(inline="always")
def _take(taken: np.ndarray, u: int) -> None:
    taken[u >> 6] |= np.uint64(1) << np.uint64(u & 63)


@_jit
def greedy_picks(
    n_keep: int, lists: np.ndarray, lengths: np.ndarray, imp: np.ndarray, t: np.ndarray, unit_major: bool
) -> np.ndarray:
    """Up to `n_keep` picks. lists[g, :lengths[g]] is the head of group g's units by descending importance
    (the full list when lengths[g] = n); t the target shares. imp is [n, K] when `unit_major` (a unit's K
    importances in one cache line, worth a transposed copy when many units are picked) or else [K, n] as
    given (K loads per fetched unit, cheaper when few are). Heads of n_keep units always suffice; should a
    group still run out of its head, fewer than `n_keep` picks are returned instead of reading past it.

    Each group keeps a queue of its next candidates that were still free when queued, with their
    importance rows fetched together: the loads are independent, so they overlap instead of each stalling
    the pick that needs it, and rows of units other groups took first are not fetched (with K = 4 most
    list entries are such units, and fetching them had cost more than the picks)."""
    K = lists.shape[0]
    n = imp.shape[0] if unit_major else imp.shape[1]
    taken = np.zeros((n >> 6) + 1, np.uint64)  # a bit per unit: stays in cache where n bytes would not
    scanned = np.zeros(K, np.int64)  # list entries of each group looked at so far
    queued = np.zeros(K, np.int64)  # queue length
    head = np.zeros(K, np.int64)  # queue read position
    queue = np.empty((K, _BLOCK), np.int64)
    rows = np.empty((K, _BLOCK, K))
    R = np.zeros(K)
    p = np.full(K, 1.0 / K)
    out = np.empty(n_keep, np.int64)
    for q in range(n_keep):
        g = 0
        m = p[0] - t[0]
        for h in range(1, K):
            v = p[h] - t[h]
            if v < m:
                g = h
                m = v
        j = head[g]
        while j < queued[g] and _is_taken(taken, queue[g, j]):  # taken by another group since it was queued
            j += 1
        if j == queued[g]:
            i = scanned[g]
            c = 0
            while c < _BLOCK and i < lengths[g]:
                w = lists[g, i]
                i += 1
                if not _is_taken(taken, w):
                    queue[g, c] = w
                    c += 1
            scanned[g] = i
            if c == 0:
                return out[:q]
            if unit_major:
                for k in range(c):
                    w = queue[g, k]
                    for h in range(K):
                        rows[g, k, h] = imp[w, h]
            else:
                for h in range(K):
                    for k in range(c):
                        rows[g, k, h] = imp[h, queue[g, k]]
            queued[g] = c
            j = 0
        u = queue[g, j]
        head[g] = j + 1
        _take(taken, u)
        out[q] = u
        s = 0.0
        for h in range(K):
            R[h] += rows[g, j, h]
            s += R[h]
        if s > 0.0:
            for h in range(K):
                p[h] = R[h] / s
        else:
            for h in range(K):
                p[h] = 1.0 / K
    return out
