"""Metrics against fairlearn's MetricFrame and hand-computed degradation figures."""

import numpy as np
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score

from onnxfair.data import _encode_groups
from onnxfair.metrics import degradation, evaluation_block, predictions


def _one_hot_logits(pred, n_classes, rng):
    logits = rng.normal(size=(pred.size, n_classes))
    logits[np.arange(pred.size), pred] += 10
    return logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_fairlearn(seed):
    rng = np.random.default_rng(seed)
    n = 500
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < 0.75, y, 1 - y)
    race = rng.choice(["A", "B", "C", "D"], n, p=[0.5, 0.3, 0.15, 0.05])
    sex = rng.choice(["F", "M"], n)
    ids, labels = _encode_groups({"race": race, "sex": sex}, ["race", "sex"])
    block = evaluation_block(_one_hot_logits(pred, 2, rng), y, ids, labels)
    sf = [f"race={r},sex={s}" for r, s in zip(race, sex)]
    mf = MetricFrame(
        metrics={"acc": accuracy_score, "sel": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate},
        y_true=y, y_pred=pred, sensitive_features=sf,
    )
    for label, row in mf.by_group.iterrows():
        g = block["groups"][label]
        assert g["n"] == sum(1 for s in sf if s == label)
        assert g["accuracy"] == pytest.approx(row["acc"], abs=1e-12)
        assert g["selection_rate"] == pytest.approx(row["sel"], abs=1e-12)
        assert g["tpr"] == pytest.approx(row["tpr"], abs=1e-12)
        assert g["fpr"] == pytest.approx(row["fpr"], abs=1e-12)
    d = block["disparity"]
    assert d["accuracy_gap"] == pytest.approx(mf.difference()["acc"], abs=1e-12)
    assert d["worst_group_accuracy"] == pytest.approx(mf.group_min()["acc"], abs=1e-12)
    assert d["demographic_parity_difference"] == pytest.approx(demographic_parity_difference(y, pred, sensitive_features=sf), abs=1e-12)
    assert d["equalized_odds_difference"] == pytest.approx(equalized_odds_difference(y, pred, sensitive_features=sf), abs=1e-12)
    assert block["overall"]["accuracy"] == pytest.approx(accuracy_score(y, pred))


def test_a_group_without_positives_has_no_tpr_and_is_left_out_of_the_equalized_odds_gap():
    """fairlearn scores an undefined rate as 0 (a group with no positives 'detects none of them'), which
    makes the gap whatever the other groups' TPR is; here the group has no TPR, and the gap is fairlearn's
    over the groups where both rates exist (documented under Metric conventions)."""
    rng = np.random.default_rng(3)
    n = 400
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < 0.8, y, 1 - y)
    race = rng.choice(["A", "B", "C"], n, p=[0.6, 0.3, 0.1])
    y[race == "C"] = 0  # group C has no positives
    ids, labels = _encode_groups({"race": race}, ["race"])
    block = evaluation_block(_one_hot_logits(pred, 2, rng), y, ids, labels)
    assert block["groups"]["race=C"]["tpr"] is None and block["groups"]["race=C"]["fpr"] is not None
    both = race != "C"
    tpr_gap = MetricFrame(metrics=true_positive_rate, y_true=y[both], y_pred=pred[both],
                          sensitive_features=race[both]).difference()
    fpr_gap = MetricFrame(metrics=false_positive_rate, y_true=y, y_pred=pred, sensitive_features=race).difference()
    assert block["disparity"]["equalized_odds_difference"] == pytest.approx(max(tpr_gap, fpr_gap), abs=1e-12)
    assert block["disparity"]["equalized_odds_difference"] < equalized_odds_difference(y, pred, sensitive_features=race)


def test_multiclass_metrics_match_fairlearn_and_classwise():
    rng = np.random.default_rng(5)
    n = 400
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, 4, n))
    tone = rng.choice(["light", "dark"], n, p=[0.9, 0.1])
    ids, labels = _encode_groups({"tone": tone}, ["tone"])
    block = evaluation_block(_one_hot_logits(pred, 4, rng), y, ids, labels)
    mf = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=[f"tone={t}" for t in tone])
    for label, acc in mf.by_group.items():
        assert block["groups"][label]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert block["disparity"]["accuracy_gap"] == pytest.approx(mf.difference(), abs=1e-12)
    assert block["disparity"]["demographic_parity_difference"] is None
    assert block["disparity"]["equalized_odds_difference"] is None
    # class-wise: per-class recall, population variance; checked against a MetricFrame keyed by class
    per_class = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=y).by_group
    assert block["classwise"]["variance"] == pytest.approx(np.var(per_class.to_numpy()), abs=1e-12)
    assert block["classwise"]["max_discrepancy"] == pytest.approx(per_class.max() - per_class.min(), abs=1e-12)


def test_small_groups_are_flagged_not_dropped():
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 1])
    pred = y.copy()
    pred[-1] = 0
    group = np.array(["a"] * 11 + ["b"])
    ids, labels = _encode_groups({"g": group}, ["g"])
    block = evaluation_block(_one_hot_logits(pred, 2, np.random.default_rng(0)), y, ids, labels)
    assert block["groups"]["g=b"] == pytest.approx({"n": 1, "accuracy": 0.0, "selection_rate": 0.0, "tpr": 0.0, "fpr": None, "small": True})
    assert block["groups"]["g=a"]["small"] is False
    assert block["disparity"]["accuracy_gap"] == pytest.approx(1.0)


def test_degradation_by_hand():
    dense = {"overall": {"accuracy": 0.90}, "groups": {"a": {"accuracy": 0.95}, "b": {"accuracy": 0.85}, "c": {"accuracy": 0.80}}}
    pruned = {"overall": {"accuracy": 0.85}, "groups": {"a": {"accuracy": 0.93}, "b": {"accuracy": 0.80}, "c": {"accuracy": 0.65}}}
    d = degradation(dense, pruned)
    deltas = np.array([-0.02, -0.05, -0.15])
    assert d["overall_delta"] == pytest.approx(-0.05)
    assert d["groups"] == pytest.approx({"a": -0.02, "b": -0.05, "c": -0.15})
    assert d["std_delta"] == pytest.approx(np.std(deltas, ddof=1))
    assert d["range_delta"] == pytest.approx(0.13)
    # psi = max_g (dense_g - pruned_g) - (dense - pruned) = 0.15 - 0.05
    assert d["max_excess_gap"] == pytest.approx(0.10)


def test_predictions_single_column():
    assert predictions(np.array([[0.2], [0.7]]), probabilities=True).tolist() == [0, 1]  # after a Sigmoid
    assert predictions(np.array([[0.2], [0.7]])).tolist() == [1, 1]  # logits: the graph decides, not the values
    assert predictions(np.array([[-1.5], [2.0], [0.3]])).tolist() == [0, 1, 1]


def test_a_conv_head_output_is_read_like_its_flattened_logits():
    """[N, C, 1, 1] (a head without Flatten) scores C classes, as the losses read it; one column stays binary."""
    flat = np.array([[0.1, 2.0, -1.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert predictions(flat[:, :, None, None]).tolist() == [1, 0, 3]
    assert predictions(np.array([[[[-0.3]]], [[[0.4]]]])).tolist() == [0, 1]
    block = evaluation_block(flat[:, :, None, None], np.array([1, 0, 2]), np.zeros(3, np.int64), ["g=a"])
    assert block["overall"]["accuracy"] == pytest.approx(2 / 3) and not block["binary"]


def test_small_groups_are_flagged_in_every_table():
    """Groups under SMALL_GROUP rows: the evaluation and the dense/pruned comparison both say so."""
    from onnxfair.metrics import SMALL_GROUP, degradation
    from onnxfair.report import format_comparison, format_evaluation

    rng = np.random.default_rng(0)
    ids = np.array([0] * 50 + [1] * (SMALL_GROUP - 1))
    y = rng.integers(0, 2, ids.size)
    dense = evaluation_block(_one_hot_logits(y, 2, rng), y, ids, ["g=big", "g=small"])
    pruned = evaluation_block(_one_hot_logits(1 - y, 2, rng), y, ids, ["g=big", "g=small"])
    for text in (format_evaluation(dense), format_comparison(dense, pruned, degradation(dense, pruned))):
        rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("g=")}
        assert rows["g=small"].endswith("(small group)") and "small" not in rows["g=big"]


# ------------------------------------------------------------------------ how precisely std_delta is measured


def _rows_resampled(dense_ok, pruned_ok, group_ids, n, seed):
    """The plain way: resample each group's rows with replacement, `n` times (the oracle of the multinomial
    shortcut), and regroup all rows at random into groups of the same sizes."""
    rng = np.random.default_rng(seed)
    rows = [np.flatnonzero(group_ids == g) for g in np.unique(group_ids)]
    boot = []
    for _ in range(n):
        d = [pruned_ok[i].mean() - dense_ok[i].mean() for i in (rng.choice(r, r.size) for r in rows)]
        boot.append(np.std(d, ddof=1))
    cuts = np.cumsum([r.size for r in rows])[:-1]
    floor = []
    for _ in range(n // 5):
        d = [pruned_ok[i].mean() - dense_ok[i].mean() for i in np.split(rng.permutation(group_ids.size), cuts)]
        floor.append(np.std(d, ddof=1))
    return np.percentile(boot, [5, 95]), np.median(floor)


@pytest.mark.parametrize("effect", [0.0, 0.15])
def test_std_delta_interval_and_noise_floor_match_resampling_the_rows(effect):
    from onnxfair.metrics import std_delta_uncertainty

    rng = np.random.default_rng(3)
    g = rng.choice(4, 3000, p=[0.6, 0.25, 0.1, 0.05])
    dense = rng.random(3000) < 0.85
    pruned = dense & (rng.random(3000) > 0.05 + effect * (g == 3))
    got = std_delta_uncertainty(dense, pruned, g, seed=1)
    (lo, hi), floor = _rows_resampled(dense, pruned, g, 4000, seed=2)
    assert got["std_delta_interval"]["low"] == pytest.approx(lo, rel=0.12)
    assert got["std_delta_interval"]["high"] == pytest.approx(hi, rel=0.12)
    assert got["std_delta_noise_floor"] == pytest.approx(floor, rel=0.12)
    # the 150-row group losing 15 more points is resolved; no effect is not
    assert (got["std_delta_p_value"] < 0.05) == (effect > 0)
    assert std_delta_uncertainty(dense, pruned, g, seed=1) == got  # seeded


def test_std_delta_uncertainty_without_change_or_groups():
    from onnxfair.metrics import std_delta_uncertainty

    ok = np.arange(100) % 3 > 0
    g = np.arange(100) % 2
    none = std_delta_uncertainty(ok, ok, g)
    assert none["std_delta_interval"]["low"] == none["std_delta_interval"]["high"] == none["std_delta_noise_floor"] == 0
    # one group: the keys stay, null (they were missing, so a report changed shape with the data)
    assert std_delta_uncertainty(ok, ~ok, np.zeros(100, np.int64)) == {
        "std_delta_interval": None, "std_delta_noise_floor": None, "std_delta_p_value": None}


def test_a_one_row_group_does_not_decide_the_verdict():
    """The interval's low end against the floor said 'resolved' whenever a lone row changed (a quarter of
    runs with no group effect); the permutation p-value is calibrated: about 5 % of such runs."""
    from onnxfair.metrics import std_delta_uncertainty

    rng = np.random.default_rng(0)
    g = np.r_[0, np.ones(400, np.int64), np.full(400, 2)]
    hits = 0
    for i in range(60):
        dense = np.ones(801, bool)
        pruned = rng.random(801) > 0.25  # a quarter of rows change, whatever their group
        hits += std_delta_uncertainty(dense, pruned, g, seed=i)["std_delta_p_value"] < 0.05
    assert hits <= 8
