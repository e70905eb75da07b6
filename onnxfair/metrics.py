"""The metrics catalogue (DESIGN.md section 7): per-group table first, disparities derived from it.

Conventions, stated in every report under `conventions`:
- accuracy gap = max_g Acc_g - min_g Acc_g over every group with at least one row (small groups included,
  flagged `small`), as fairlearn's MetricFrame.difference(method="between_groups");
- demographic parity difference and equalized odds difference as fairlearn defines them (binary tasks,
  positive class 1), except that a group without positives (negatives) has no TPR (FPR) and is left out of
  that rate's gap, where fairlearn would count the missing rate as 0;
- class-wise variance is the population variance (ddof 0) of per-class accuracy (recall per class);
- Δ_g = Acc_g(pruned) - Acc_g(dense); std_delta is the sample standard deviation (ddof 1) of Δ_g;
- max_excess_gap ψ = max_g [(Acc_g(dense) - Acc_g(pruned)) - (Acc(dense) - Acc(pruned))].
"""

from __future__ import annotations

import numpy as np

from onnxfair.model import classes_of

SMALL_GROUP = 10  # groups with fewer rows are reported and flagged, not dropped

CONVENTIONS = {
    "accuracy_gap": "max_g Acc_g - min_g Acc_g over all groups with rows (fairlearn between_groups difference)",
    "demographic_parity_difference": "max_g P(yhat=1|g) - min_g P(yhat=1|g); binary tasks, positive class 1",
    "equalized_odds_difference": "max(TPR gap, FPR gap) across groups (fairlearn); binary tasks; a group without "
                                 "positives (negatives) has no TPR (FPR) and is left out of that gap",
    "classwise_variance": "population variance (ddof 0) of per-class accuracy",
    "delta": "Acc_g(pruned) - Acc_g(dense); negative is degradation",
    "std_delta": "sample standard deviation (ddof 1) of delta over groups",
    "max_excess_gap": "max_g [(Acc_g(dense)-Acc_g(pruned)) - (Acc(dense)-Acc(pruned))]",
    "small_group": f"groups with fewer than {SMALL_GROUP} rows are flagged small, not dropped",
}


def predictions(outputs: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """Class index per row: argmax over the non-batch dims (as the losses read logits); a single column is
    class 1 above 0.5 when the graph ends in a Sigmoid (`probabilities`), else a logit above 0. The graph
    decides, not the values: a logit model whose outputs all fall in [0, 1] is still read at 0. A single
    integer column holds the class indices themselves (an ArgMax head)."""
    out = np.asarray(outputs)
    if out.ndim == 1 or int(np.prod(out.shape[1:])) == 1:
        flat = out.reshape(out.shape[0])
        if out.dtype.kind in "biu":
            return flat.astype(np.int64)
        return (flat > (0.5 if probabilities else 0.0)).astype(np.int64)
    return out.reshape(out.shape[0], -1).argmax(axis=1).astype(np.int64)


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def group_table(
    y_true: np.ndarray, y_pred: np.ndarray, group_ids: np.ndarray, group_labels: list[str], binary: bool
) -> dict[str, dict]:
    """Per group: n, accuracy; for binary tasks selection rate, TPR and FPR (None where undefined)."""
    table: dict[str, dict] = {}
    for g, label in enumerate(group_labels):
        rows = group_ids == g
        n = int(rows.sum())
        yt, yp = y_true[rows], y_pred[rows]
        entry: dict = {"n": n, "accuracy": _rate(yt == yp)}
        if binary:
            entry["selection_rate"] = _rate(yp == 1)
            entry["tpr"] = _rate(yp[yt == 1] == 1)
            entry["fpr"] = _rate(yp[yt == 0] == 1)
        entry["small"] = n < SMALL_GROUP
        table[label] = entry
    return table


def _spread(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(max(vals) - min(vals)) if vals else None


def disparity(table: dict[str, dict], binary: bool) -> dict:
    """Accuracy gap, worst-group accuracy, and for binary tasks DP and EO differences."""
    rows = [t for t in table.values() if t["n"] > 0]
    accs = [t["accuracy"] for t in rows]
    out = {
        "accuracy_gap": _spread(accs),
        "worst_group_accuracy": float(min(accs)) if accs else None,
        "demographic_parity_difference": None,
        "equalized_odds_difference": None,
    }
    if binary:
        out["demographic_parity_difference"] = _spread([t["selection_rate"] for t in rows])
        tpr_gap = _spread([t["tpr"] for t in rows])
        fpr_gap = _spread([t["fpr"] for t in rows])
        gaps = [g for g in (tpr_gap, fpr_gap) if g is not None]
        out["equalized_odds_difference"] = float(max(gaps)) if gaps else None
    return out


def classwise(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Per-class accuracy (recall), its population variance and max-min discrepancy."""
    per_class = {}
    for c in range(n_classes):
        rows = y_true == c
        if rows.any():
            per_class[str(c)] = float((y_pred[rows] == c).mean())
    vals = np.array(list(per_class.values()))
    return {
        "per_class_accuracy": per_class,
        "variance": float(vals.var()) if vals.size else None,
        "max_discrepancy": float(vals.max() - vals.min()) if vals.size else None,
    }


def evaluation_block(
    outputs: np.ndarray, y_true: np.ndarray, group_ids: np.ndarray, group_labels: list[str], probabilities: bool = False
) -> dict:
    """Everything metric-related about one model on one dataset (latency is added by the caller)."""
    y_pred = predictions(outputs, probabilities)
    n_classes = int(max(classes_of(outputs.shape) or 2, y_true.max() + 1, y_pred.max(initial=0) + 1))
    binary = n_classes == 2
    table = group_table(y_true, y_pred, group_ids, group_labels, binary)
    return {
        "overall": {"n": int(y_true.size), "accuracy": float((y_true == y_pred).mean())},
        "groups": table,
        "disparity": disparity(table, binary),
        "classwise": classwise(y_true, y_pred, n_classes),
        "binary": binary,
    }


RESAMPLES = 1000  # bootstrap draws for std_delta's interval
RELABELLINGS = 200  # random regroupings for its noise floor


def std_delta_uncertainty(dense_ok: np.ndarray, pruned_ok: np.ndarray, group_ids: np.ndarray,
                          seed: int = 0) -> dict:
    """How precisely the evaluated rows measure std_delta: its 90 % bootstrap interval (rows resampled
    within each group, group sizes kept), its noise floor, the median std_delta over random regroupings of
    the rows into groups of the same sizes, i.e. what sampling noise gives with no group effect at all, and
    the permutation p-value of the observed std_delta against those regroupings.

    A row's change is pruned_ok - dense_ok in {-1, 0, 1} and a group's delta is its mean, so a resampled
    group draws its counts of each change from a multinomial, and a regrouping from a multivariate
    hypergeometric: no array of resampled rows is built. With fewer than two groups there is no std_delta
    to resolve: the keys are there, null, so a report keeps one shape."""
    change = pruned_ok.astype(np.int64) - dense_ok.astype(np.int64)
    present = np.unique(group_ids)
    if len(present) < 2:
        return {"std_delta_interval": None, "std_delta_noise_floor": None, "std_delta_p_value": None}
    counts = np.array([[np.sum(change[group_ids == g] == v) for v in (-1, 0, 1)] for g in present])
    sizes = counts.sum(1)
    rng = np.random.default_rng(seed)

    def spread(draws: np.ndarray) -> np.ndarray:  # draws [R, G, 3] -> std over groups of the deltas, per draw
        deltas = (draws[..., 2] - draws[..., 0]) / sizes
        return deltas.std(axis=1, ddof=1)

    boot = np.stack([rng.multinomial(n, c / n, size=RESAMPLES) for n, c in zip(sizes, counts)], axis=1)
    total = counts.sum(0)
    regrouped = np.empty((RELABELLINGS, len(present), 3), dtype=np.int64)
    for r in range(RELABELLINGS):
        left = total.copy()
        for j, n in enumerate(sizes):
            regrouped[r, j] = rng.multivariate_hypergeometric(left, n)
            left -= regrouped[r, j]
    low, high = np.percentile(spread(boot), [5, 95])
    observed = spread(counts[None])[0]
    noise = spread(regrouped)
    return {"std_delta_interval": {"low": float(low), "high": float(high), "level": 0.9, "resamples": RESAMPLES},
            "std_delta_noise_floor": float(np.median(noise)),
            # share of regroupings at least as spread as the rows' own groups (+1 counts the observed grouping)
            "std_delta_p_value": float((np.sum(noise >= observed - 1e-12) + 1) / (RELABELLINGS + 1))}


def degradation(dense: dict, pruned: dict) -> dict:
    """Dense-vs-pruned comparison: Δ_g, their sample std and range, max excess accuracy gap ψ."""
    overall_delta = pruned["overall"]["accuracy"] - dense["overall"]["accuracy"]
    deltas = {}
    for label, d in dense["groups"].items():
        p = pruned["groups"].get(label)
        if p is None or d["accuracy"] is None or p["accuracy"] is None:
            continue
        deltas[label] = float(p["accuracy"] - d["accuracy"])
    vals = np.array(list(deltas.values()), dtype=np.float64)
    return {
        "overall_delta": float(overall_delta),
        "groups": deltas,
        "std_delta": float(vals.std(ddof=1)) if vals.size > 1 else None,
        "range_delta": float(vals.max() - vals.min()) if vals.size else None,
        "max_excess_gap": float(np.max(-vals + overall_delta)) if vals.size else None,
    }
