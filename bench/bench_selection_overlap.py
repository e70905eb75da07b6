"""Why FairGRAPE's selection can (or cannot) differ from a group-blind one, on the fixtures.

FairGRAPE keeps each group's share of a layer's importance. That can only change the kept set where the
groups' importances disagree; where they agree, the share-keeping greedy keeps what the group-blind
ranking of the same importances keeps. This measures, per fixture and layer (unstructured, per layer, the
whole calibration split, FairGRAPE's own importance I[g, w] = Σ_batches (w · ∂L_g/∂w)²):

- rho: Spearman correlation between the groups' importance vectors (the mean over pairs of groups),
- overlap: the share of FairGRAPE's kept weights that the group-blind ranking of Σ_g I[g, w] also keeps,
- kept share: the fraction of each group's importance that the kept weights hold, under FairGRAPE and under
  the group-blind ranking (equal fractions mean the blind set already keeps every group's share),
- vs magnitude: the share of FairGRAPE's kept weights that magnitude also keeps,
- and per group its mean calibration loss and its share of the model's total importance (FairGRAPE's
  target share t_g, summed over layers): a group the model fits well has small gradients, so small
  importance, whatever removing a weight would cost it.

Layers are weighted by their weight count. Seed-free: the whole calibration split is scored once.

    python bench/bench_selection_overlap.py [--models adult_mlp,resnet_digits] [--sparsities 0.5,0.9]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxfair.data import load_dataset  # noqa: E402
from onnxfair.importance import accumulate_gradients  # noqa: E402
from onnxfair.importance.fairgrape import greedy_order  # noqa: E402
from onnxfair.interpret import OnnxModule  # noqa: E402
from onnxfair.model import load_model  # noqa: E402
from onnxfair.prune import weight_names  # noqa: E402

FIXTURES = {  # name: (model file, calibration data, group attribute)
    "adult_mlp": ("adult_mlp.onnx", "adult_calib.npz", "race"),
    "resnet_digits": ("resnet_digits.onnx", "digits_calib.npz", "tone"),
    "mobilenet_digits": ("mobilenet_digits.onnx", "digits_calib.npz", "tone"),
}


def _ranks(v: np.ndarray) -> np.ndarray:
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def top(score: np.ndarray, n_keep: int) -> np.ndarray:
    """The n_keep highest scores, ties to the lower index (as the product's rankings)."""
    return np.lexsort((np.arange(len(score)), -score))[:n_keep]


def layer_figures(imp: np.ndarray, w: np.ndarray, sparsity: float) -> dict:
    """imp [K, n] (groups with rows only), w [n]: the figures for one layer."""
    k, n = imp.shape
    n_keep = max(1, int(round(n * (1 - sparsity))))
    fair = greedy_order(imp, n_keep)
    blind = top(imp.sum(0), n_keep)
    mag = top(np.abs(w), n_keep)
    total = imp.sum(1)
    pairs = [spearman(imp[i], imp[j]) for i in range(k) for j in range(i + 1, k)]
    return {
        "n": n,
        "rho": float(np.mean(pairs)) if pairs else float("nan"),
        "overlap": len(np.intersect1d(fair, blind)) / n_keep,
        "vs_magnitude": len(np.intersect1d(fair, mag)) / n_keep,
        "kept_fair": imp[:, fair].sum(1) / total,
        "kept_blind": imp[:, blind].sum(1) / total,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(FIXTURES))
    p.add_argument("--sparsities", default="0.5,0.9")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    sparsities = [float(s) for s in a.sparsities.split(",")]
    print("| fixture | groups (calibration rows) | loss per group | share of importance | sparsity | rho | overlap "
          "with group-blind | kept share of each group's importance, FairGRAPE | same, group-blind | overlap with "
          "magnitude |")
    print("|---|---|---|---|---:|---:|---:|---|---|---:|")
    for name in a.models.split(","):
        file, data, attr = FIXTURES[name]
        model = load_model(ROOT / "fixtures" / file)
        ds = load_dataset(ROOT / "fixtures" / data, model, attr)
        mod = OnnxModule(model)
        names = weight_names(model)
        stats = accumulate_gradients(mod, ds, names, sq=True, batch_size=a.batch_size)
        present = stats.n_rows > 0
        groups = ", ".join(f"{lab.split('=')[-1]} ({int(n)})" for lab, n, ok in
                           zip(stats.group_labels, stats.n_rows, present) if ok)
        params = mod.params
        losses = " / ".join(f"{v:.3f}" for v in stats.group_loss[present])
        totals = sum(stats.sq[n].reshape(len(present), -1)[present].sum(1) for n in names)
        total_shares = " / ".join(f"{v:.3f}" for v in totals / totals.sum())
        for sp in sparsities:
            rows = [layer_figures(stats.sq[n].reshape(len(present), -1)[present],
                                  params[n].detach().double().numpy().reshape(-1), sp) for n in names]
            weight = np.array([r["n"] for r in rows], float)
            weight /= weight.sum()

            def mean(key):
                return np.tensordot(weight, np.array([r[key] for r in rows]), axes=1)

            def shares(key):
                return " / ".join(f"{v:.3f}" for v in mean(key))

            print(f"| {name} | {groups} | {losses} | {total_shares} | {sp} | {mean('rho'):.2f} | {mean('overlap'):.3f} | {shares('kept_fair')} "
                  f"| {shares('kept_blind')} | {mean('vs_magnitude'):.3f} |")


if __name__ == "__main__":
    main()
