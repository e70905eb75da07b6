"""How precisely can the evaluation split measure std_delta? Bootstrap intervals for the methods target.

The methods target compares std_delta (sample std over groups of per-group accuracy change) between
FairGRAPE and magnitude. With small groups (Adult's `Other` race group has 41 evaluation rows: one row is
2.4 points) the statistic itself is noisy, whatever the method. This bench prunes as
`bench_methods.py` does (same settings, same seeded 80 % calibration subsamples), keeps every run's
per-row correctness on the evaluation split, and resamples the evaluation rows (with replacement, within
each group, so group sizes stay fixed) to give:

- per run: std_delta, its 90 % bootstrap interval, and its noise floor: the median std_delta over random
  relabellings of the rows into groups of the same sizes (no group effect at all, only sampling noise);
- per FairGRAPE seed: the ratio to magnitude's std_delta on the same resamples, its 90 % interval and the
  share of resamples where the ratio is <= 0.5 (the target);
- the verdict's statistic (mean over seeds of FairGRAPE's std_delta / magnitude's), with its interval.

    python bench/bench_resolution.py                          # adult_mlp at 0.9, seeds 0,1,2
    python bench/bench_resolution.py --models resnet_digits --sparsity 0.5
    python bench/bench_resolution.py --eval-split holdout      # Adult judged on 14,281 rows
    python bench/bench_resolution.py --eval-split holdout --iterations paper --step-epochs 1 --finetune-epochs 4
    python bench/bench_resolution.py --models resnet_digits --repair balanced --finetune-epochs 4 --damping 10

With weight updates (fine-tuning or retraining between steps) or the statistics repair magnitude uses the data too, so it is run
for every seed and the ratio is taken against the mean of its seeds.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from bench.bench_methods import CALIB_FRACTION, FIXTURES, calib_subsample, schedule  # noqa: E402
from onnxfair.finetune import LOSSES  # noqa: E402
from onnxfair.data import GroupedDataset, load_dataset  # noqa: E402
from onnxfair.head import output_activation  # noqa: E402
from onnxfair.metrics import predictions  # noqa: E402
from onnxfair.prune import PruneConfig, prune_model  # noqa: E402
from onnxfair.runtime import create_session  # noqa: E402


def correct(model: onnx.ModelProto, ds: GroupedDataset) -> np.ndarray:
    """Per-row correctness of `model` on `ds`, through onnxruntime."""
    out = create_session(model, "cpu", None, 1).run(ds.inputs, 256)
    return predictions(out, output_activation(model) is not None) == ds.y


def std_delta(ok: np.ndarray, dense_ok: np.ndarray, members: list[np.ndarray]) -> float:
    d = [ok[r].mean() - dense_ok[r].mean() for r in members]
    return float(np.std(d, ddof=1))


def resamples(group_ids: np.ndarray, n: int, seed: int) -> list[list[np.ndarray]]:
    """`n` bootstrap resamples of the rows, each a list of per-group row indices (group sizes kept)."""
    rng = np.random.default_rng(seed)
    rows = [np.flatnonzero(group_ids == g) for g in range(int(group_ids.max()) + 1)]
    return [[rng.choice(r, r.size) for r in rows] for _ in range(n)]


def relabellings(group_ids: np.ndarray, n: int, seed: int) -> list[list[np.ndarray]]:
    """`n` random partitions of the rows into groups of the original sizes."""
    rng = np.random.default_rng(seed)
    sizes = np.bincount(group_ids)
    cuts = np.cumsum(sizes)[:-1]
    return [np.split(rng.permutation(group_ids.size), cuts) for _ in range(n)]


def interval(x: np.ndarray) -> str:
    lo, hi = np.percentile(x, [5, 95])
    return f"[{lo:.2f}, {hi:.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="adult_mlp")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--groups", default=None, help="group attribute (default: the fixture's, as in bench_methods)")
    ap.add_argument("--scope", default="layer", choices=["layer", "global"])
    ap.add_argument("--calib-fraction", type=float, default=CALIB_FRACTION)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--eval-split", default="eval", choices=["eval", "holdout"],
                    help="judge on fixtures/<data>_eval.npz or, Adult only, the larger adult_holdout.npz")
    ap.add_argument("--iterations", default="1", help="as in bench_methods: a step count or 'paper'")
    ap.add_argument("--step-epochs", type=int, default=0)
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("--patience", type=int, default=0, help="as in bench_methods (0: every epoch runs, as measured)")
    ap.add_argument("--repair", default="none", choices=["none", "balanced", "plain"], help="as in bench_methods")
    ap.add_argument("--finetune-loss", default="ce", choices=LOSSES,
                    help="as in bench_methods")
    ap.add_argument("--damping", type=float, default=0.0, help="FairGRAPE's --damping (0: the paper's importance)")
    args = ap.parse_args(argv)
    trained = bool(args.finetune_epochs or args.step_epochs or args.repair != "none")  # magnitude then uses data
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.models.split(","):
        file, prefix, attr = FIXTURES[name]
        attr = args.groups or attr
        model = onnx.load(str(ROOT / "fixtures" / file))
        calib, ev = (load_dataset(ROOT / "fixtures" / f"{prefix}_{s}.npz", model, attr) for s in ("calib", args.eval_split))
        members = [np.flatnonzero(ev.group_ids == g) for g in range(len(ev.group_labels))]
        boots = resamples(ev.group_ids, args.resamples, seed=0)
        shuffles = relabellings(ev.group_ids, args.resamples, seed=1)
        dense_ok = correct(model, ev)
        runs: dict[tuple[str, int], np.ndarray] = {}
        for method in ("magnitude", "taylor", "fairgrape"):
            steps = schedule(method, args.sparsity, args)
            fine_tunes = args.finetune_epochs or steps["step_epochs"]
            for seed in seeds[:1] if method == "magnitude" and not trained else seeds:  # magnitude alone ignores data
                cfg = PruneConfig(method=method, structured=False, sparsity=args.sparsity, scope=args.scope,
                                  seed=seed, latency=False, device="cpu", threads=1,
                                  finetune_epochs=args.finetune_epochs, finetune_loss=args.finetune_loss,
                                  repair=args.repair,
                                  damping=args.damping if method == "fairgrape" else 0.0,
                                  **steps, **({"finetune_patience": args.patience} if fine_tunes else {}))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pruned = prune_model(model, calib_subsample(calib, seed, args.calib_fraction), ev, cfg).model
                runs[(method, seed)] = correct(pruned, ev)
        boot_sd = {k: 100 * np.array([std_delta(ok, dense_ok, b) for b in boots]) for k, ok in runs.items()}
        sizes = ", ".join(f"{lab} {m.size}" for lab, m in zip(ev.group_labels, members))
        sched = schedule("fairgrape", args.sparsity, args)
        how = (f"{sched['iterations']} steps, {sched['step_epochs']} epochs between" if sched["iterations"] > 1
               else "one shot")
        how += f", {args.finetune_epochs} fine-tuning epochs after" if args.finetune_epochs else ""
        how += f" ({args.finetune_loss} loss)" if args.finetune_epochs and args.finetune_loss != "ce" else ""
        how += f", {args.repair} repair" if args.repair != "none" else ""
        how += f", fairgrape damping {args.damping:g}" if args.damping else ""
        print(f"\n{name} ({attr}, {args.eval_split} split) @ sparsity {args.sparsity:g}, {args.scope} scope, unstructured, {how}; evaluation rows per group: {sizes}")
        print(f"{'run':>16}  {'accuracy %':>10}  {'std_delta':>9}  {'90% interval':>16}  {'noise floor':>11}")
        for (method, seed), ok in runs.items():
            sd = 100 * std_delta(ok, dense_ok, members)
            floor = 100 * np.median([std_delta(ok, dense_ok, b) for b in shuffles])
            print(f"{method + ' s' + str(seed):>16}  {100 * ok.mean():10.2f}  {sd:9.2f}  "
                  f"{interval(boot_sd[(method, seed)]):>16}  {floor:11.2f}")
        mag_seeds = [k for k in runs if k[0] == "magnitude"]
        mag = np.mean([boot_sd[k] for k in mag_seeds], axis=0)
        point_mag = np.mean([100 * std_delta(runs[k], dense_ok, members) for k in mag_seeds])
        print(f"\n{'fairgrape seed':>16}  {'ratio':>6}  {'90% interval':>16}  {'P(ratio <= 0.5)':>15}")
        ratios = []
        for seed in seeds:
            r = boot_sd[("fairgrape", seed)] / mag
            ratios.append(r)
            point = 100 * std_delta(runs[("fairgrape", seed)], dense_ok, members) / point_mag
            print(f"{seed:>16}  {point:6.2f}  {interval(r):>16}  {np.mean(r <= 0.5):15.2f}")
        mean_fg = np.mean([boot_sd[("fairgrape", s)] for s in seeds], axis=0)
        point = np.mean([100 * std_delta(runs[("fairgrape", s)], dense_ok, members) for s in seeds]) / point_mag
        r = mean_fg / mag
        print(f"{'mean of seeds':>16}  {point:6.2f}  {interval(r):>16}  {np.mean(r <= 0.5):15.2f}")
        print("(ratio = FairGRAPE std_delta / magnitude std_delta"
              + (" (mean of its seeds)" if len(mag_seeds) > 1 else "") + " on the same resample; target <= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
