"""FairGRAPE's greedy share-keeping rule: hand traces and equivalence to a plain per-weight loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxfair.importance.fairgrape import (
    greedy_order,
    normalise_pool,
    order_reference,
    share_targets,
)
from onnxfair.importance.order import descending_order

METHODS = ["reference", "compiled"]


def oracle(importance, n_keep):
    """The rule as stated, one weight per iteration, Python floats (independent of the module)."""
    imp = [list(map(float, row)) for row in np.asarray(importance, dtype=np.float64)]
    imp = [row for row in imp if sum(row) > 0]  # groups without importance take no part
    n = len(importance[0]) if len(importance) else 0
    n_keep = min(n_keep, n)
    if not imp:
        return list(range(n_keep))
    K = len(imp)
    totals = [sum(row) for row in imp]
    t = [T / sum(totals) for T in totals]
    lists = [sorted(range(n), key=lambda u, row=row: (-row[u], u)) for row in imp]
    ptr = [0] * K
    taken = set()
    R = [0.0] * K
    p = [1.0 / K] * K
    out = []
    while len(out) < n_keep:
        d = [p[g] - t[g] for g in range(K)]
        g = d.index(min(d))
        while lists[g][ptr[g]] in taken:
            ptr[g] += 1
        u = lists[g][ptr[g]]
        taken.add(u)
        out.append(u)
        R = [R[h] + imp[h][u] for h in range(K)]
        s = 0.0
        for r in R:
            s += r
        p = [r / s for r in R] if s > 0 else [1.0 / K] * K
    return out


def all_methods(imp, n_keep):
    return {m: greedy_order(imp, n_keep, method=m).tolist() for m in METHODS}


def test_hand_trace_equal_targets():
    imp = np.array([[4, 3, 0, 1, 2], [0, 1, 5, 2, 2]], dtype=float)
    # T = (10, 10), t = (0.5, 0.5)
    # 1: p = (.5, .5), d = (0, 0) tie -> group 0 takes w0 (4)         R = (4, 0)  p = (1, 0)
    # 2: d = (.5, -.5) -> group 1 takes w2 (5)                        R = (4, 5)  p = (4/9, 5/9)
    # 3: d = (-.056, .056) -> group 0: w0 taken, takes w1 (3)        R = (7, 6)  p = (7/13, 6/13)
    # 4: d = (.038, -.038) -> group 1: w2 taken; w3, w4 tie at 2 -> w3 (lower index)  R = (8, 8)
    # 5: p = (.5, .5), d = (0, 0) tie -> group 0: w0, w1 taken, next w4 (2)
    assert share_targets(imp).tolist() == [0.5, 0.5]
    for m, got in all_methods(imp, 5).items():
        assert got == [0, 2, 1, 3, 4], m
    assert greedy_order(imp, 3).tolist() == [0, 2, 1]


def test_hand_trace_unequal_targets():
    imp = np.array([[6, 1, 0, 3, 2], [1, 0, 2, 0, 1]], dtype=float)
    # T = (12, 4), t = (.75, .25)
    # 1: p = (.5, .5), d = (-.25, .25) -> group 0 takes w0 (6)        R = (6, 1)  p = (6/7, 1/7)
    # 2: d = (.107, -.107) -> group 1 takes w2 (2)                    R = (6, 3)  p = (2/3, 1/3)
    # 3: d = (-.083, .083) -> group 0: next best w3 (3)               R = (9, 3)  p = (.75, .25)
    # 4: d = (0, 0) tie -> group 0 takes w4 (2)                       R = (11, 4) p = (11/15, 4/15)
    # 5: d = (-.017, .017) -> group 0 takes w1 (1)
    assert share_targets(imp).tolist() == [0.75, 0.25]
    for m, got in all_methods(imp, 5).items():
        assert got == [0, 2, 3, 4, 1], m


def test_hand_trace_three_groups():
    imp = np.array([[3, 0, 1], [0, 2, 0], [1, 1, 2]], dtype=float)
    # T = (4, 2, 4), t = (.4, .2, .4)
    # 1: p = 1/3 each, d = (-.067, .133, -.067) -> tie 0/2 -> group 0 takes w0   R = (3, 0, 1)  p = (.75, 0, .25)
    # 2: d = (.35, -.2, -.15) -> group 1 takes w1                                   R = (3, 2, 2)  p = (3/7, 2/7, 2/7)
    # 3: d = (.029, .086, -.114) -> group 2: w2 (2)
    for m, got in all_methods(imp, 3).items():
        assert got == [0, 1, 2], m


def test_groups_without_importance_take_no_part_and_all_zero_is_index_order():
    imp = np.array([[0, 0, 0, 0], [1, 4, 2, 3]], dtype=float)
    for m, got in all_methods(imp, 4).items():
        assert got == [1, 3, 2, 0], m
    assert greedy_order(np.zeros((3, 5)), 3).tolist() == [0, 1, 2]
    assert greedy_order(np.ones((2, 4)), 0).tolist() == []


def random_case(rng, kind, K, n):
    if kind == 0:
        return rng.random((K, n))
    if kind == 1:
        return rng.integers(0, 4, (K, n)).astype(float)  # many exact ties
    if kind == 2:
        base = rng.lognormal(0, 2, n)
        return (base * rng.lognormal(0, 0.5, (K, n))) ** 2  # heavy-tailed, correlated across groups
    imp = rng.random((K, n)) * (rng.random((K, n)) < 0.3)  # sparse, some all-zero weights
    imp[rng.integers(0, K)] = 0.0 if rng.random() < 0.3 else imp[0]
    return imp


@pytest.mark.parametrize("seed", range(40))
def test_equivalence_with_the_plain_loop(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 6))
    n = int(rng.integers(1, 400))
    imp = random_case(rng, seed % 4, K, n)
    n_keep = int(rng.integers(0, n + 1))
    expected = oracle(imp, n_keep)
    for m, got in all_methods(imp, n_keep).items():
        assert got == expected, m


@pytest.mark.parametrize("seed", range(4))
def test_compiled_loop_on_larger_cases(seed):
    # long enough for many block refills and long skips over units other groups took
    rng = np.random.default_rng(100 + seed)
    n = 20000
    imp = random_case(rng, [0, 1, 2, 3][seed], 2 + seed % 3, n)
    n_keep = int(n * [0.5, 0.1, 0.9, 0.3][seed])
    assert np.array_equal(greedy_order(imp, n_keep), order_reference(imp, n_keep))


def test_methods_agree_on_column_major_input_with_an_idle_group():
    # the idle group is dropped by a copy; both methods must take their target shares from that copy, or
    # row sums over a Fortran-ordered array differ in the last bits and near-ties can go either way
    rng = np.random.default_rng(12)
    imp = np.asfortranarray(np.vstack([rng.random((2, 50000)) ** 3, np.zeros((1, 50000))]))
    assert greedy_order(imp, 20000).tolist() == greedy_order(imp, 20000, method="reference").tolist()
    assert greedy_order(imp, 20000).tolist() == order_reference(np.ascontiguousarray(imp[:2]), 20000).tolist()


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        greedy_order(np.ones((2, 3)), 1, method="merge")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=4), st.integers(0, 6))
def test_equivalence_on_tied_integer_importances(rows, n_keep):
    imp = np.array(rows, dtype=float)
    expected = oracle(imp, n_keep)
    for m, got in all_methods(imp, n_keep).items():
        assert got == expected, m


def test_prefix_property_and_reference_agree():
    rng = np.random.default_rng(7)
    imp = rng.random((3, 200))
    full = greedy_order(imp, 200)
    assert sorted(full.tolist()) == list(range(200))
    for k in (0, 1, 17, 100, 199):
        assert greedy_order(imp, k).tolist() == full[:k].tolist()
    assert order_reference(imp, 50).tolist() == full[:50].tolist()


def test_normalise_pool_makes_the_mean_unit_total_one():
    imp = np.array([[2.0, 4.0], [2.0, 0.0]])
    out = normalise_pool(imp)
    assert out.sum(0).mean() == pytest.approx(1.0)
    assert (normalise_pool(np.zeros((2, 3))) == 0).all()


def test_rejects_negative_or_nan():
    with pytest.raises(ValueError):
        greedy_order(np.array([[1.0, -1.0]]), 1)
    with pytest.raises(ValueError):
        greedy_order(np.array([[1.0, np.nan]]), 1)
    for bad in (np.inf, -np.inf):
        with pytest.raises(ValueError, match="finite"):
            greedy_order(np.array([[1.0, 2.0], [bad, 1.0]]), 1)


@pytest.mark.parametrize("depth", [1, 7, 500, 3500, 4999, 5000, 9000])
def test_sorted_heads_are_exact_prefixes_of_the_full_lists(depth):
    # ties straddling the cut are kept whole, in index order, so every head is the full list's prefix
    from onnxfair.importance.fairgrape import _sorted_heads

    rng = np.random.default_rng(depth)
    imp = rng.integers(0, 5, (3, 5000)).astype(float) * rng.choice([1.0, 2.5e-3], (3, 5000))
    imp[rng.random((3, 5000)) < 0.2] = -0.0  # equal to 0.0, and must tie with it
    lists, lengths = _sorted_heads(imp, depth)
    for g in range(3):
        full = descending_order(imp[g])
        assert lengths[g] >= min(depth, 5000)
        assert lists[g, : lengths[g]].tolist() == full[: lengths[g]].tolist()


@pytest.mark.parametrize("layout", ["random", "strided"])
def test_sorted_heads_on_large_pools_sampled_cut_and_its_fallback(layout):
    # the head's cut is estimated from a strided sample; "strided" puts all large values exactly on the
    # sampled positions, so the estimate admits too few units and the exact cut must take over
    from onnxfair.importance.fairgrape import _SAMPLE, _head_members, _sorted_heads

    n, depth = 300000, 150000
    rng = np.random.default_rng(11)
    imp = rng.random((2, n))
    if layout == "strided":
        imp[:, :: max(1, n // _SAMPLE)] += 10.0
    members, values = _head_members(imp[0], depth)
    assert members.size >= depth
    assert (np.diff(members) > 0).all() and np.array_equal(values, imp[0, members])
    assert np.count_nonzero(imp[0] >= imp[0, members].min()) == members.size  # everything above a cut: the depth largest and more
    lists, lengths = _sorted_heads(imp, depth)
    for g in range(2):
        assert lists[g, : lengths[g]].tolist() == descending_order(imp[g])[: lengths[g]].tolist()


def test_kernel_compiles_without_a_writable_cache(monkeypatch):
    # numba refuses cache=True when no cache folder is writable (a read-only install without a home
    # folder); the kernel then compiles per process instead, with the same picks
    import importlib.util

    import numba.core.caching
    from onnxfair.importance import greedy_kernel

    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    spec = importlib.util.spec_from_file_location("greedy_kernel_uncached", greedy_kernel.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert type(module.greedy_picks._cache).__name__ == "NullCache"
    imp = np.random.default_rng(5).random((3, 300))
    lists = np.stack([descending_order(imp[g]) for g in range(3)])
    for unit_major, rows in ((True, np.ascontiguousarray(imp.T)), (False, imp)):
        got = module.greedy_picks(150, lists, np.full(3, 300), rows, share_targets(imp), unit_major)
        assert got.tolist() == order_reference(imp, 150).tolist()


def test_kernel_stops_short_instead_of_reading_past_a_head():
    # heads of n_keep units always suffice (see _sorted_heads); given shorter ones, the kernel returns the
    # picks it could make, which are the reference's first picks, and never reads past a head's length
    from onnxfair.importance.greedy_kernel import greedy_picks

    imp = np.random.default_rng(6).random((3, 2000))
    lists = np.stack([descending_order(imp[g]) for g in range(3)])
    lists[:, 40:] = lists[0, 1999]  # past the heads: the least important unit, which would show if read
    got = greedy_picks(500, lists, np.full(3, 40), imp, share_targets(imp), False)
    assert 40 <= got.size < 120 and lists[0, 1999] not in got
    assert got.tolist() == order_reference(imp, got.size).tolist()
