"""Exact descending orders (every ranking in selection): ties by index, doubles beyond float32, signs."""

import numpy as np
import pytest

from onnxfair.importance.order import descending_order


def expected_order(v):
    return sorted(range(len(v)), key=lambda u: (-v[u], u))


@pytest.mark.parametrize("n", [5, 4095, 4096, 50000])
def test_descending_order_breaks_ties_by_index(n):
    # both the small-array and the large-array sort paths, with many exact ties, zeros and -0.0
    rng = np.random.default_rng(n)
    v = rng.integers(0, 7, n).astype(float) * rng.choice([1.0, 1e-300, 3.5e7], n)
    v[rng.random(n) < 0.05] = -0.0
    expected = sorted(range(n), key=lambda u: (-v[u], u))
    got = descending_order(v)
    assert got.dtype == np.int64
    assert got.tolist() == expected


def test_descending_order_separates_doubles_that_share_a_float32():
    # the sort runs on float32 keys; doubles that round to one float32 (and values beyond float32's
    # range, which all become inf) must still come out in exact double order, ties by index
    rng = np.random.default_rng(3)
    base = rng.choice([1.0, 3.0, 1e300, 0.0], 20000)
    v = base * (1.0 + rng.integers(0, 4, 20000) * 2.0**-40)  # equal in float32, different in float64
    expected = sorted(range(v.size), key=lambda u: (-v[u], u))
    assert descending_order(v).tolist() == expected


@pytest.mark.parametrize("n", [300, 60000])
def test_negative_and_infinite_scores_are_ordered_too(n):
    # bi-level's mask logits are signed; -inf/+inf and -0.0 must land where the numbers say
    rng = np.random.default_rng(n)
    v = rng.normal(0, 1, n) * rng.choice([1.0, 1e-30, 1e30, 0.0], n)
    v[rng.random(n) < 0.01] = -np.inf
    v[rng.random(n) < 0.01] = np.inf
    v[rng.random(n) < 0.05] = -0.0
    v[: n // 10] = np.round(v[: n // 10], 1)  # exact ties across signs
    assert descending_order(v).tolist() == expected_order(v)


def test_nan_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        descending_order(np.array([1.0, np.nan] * 3000))
