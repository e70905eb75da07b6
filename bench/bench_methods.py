"""Fairness/accuracy table per pruning method on the fixtures: the product's acceptance check.

Each run prunes with a seeded, group-stratified 80 % subsample of the calibration split and is judged on
the evaluation split: overall accuracy, std_delta (sample std of per-group accuracy change, FairGRAPE's
disparity of degradation) and max_excess_gap (psi, Balancing Act), reported as mean +- sample std over
seeds. The subsample is what makes seeds meaningful for one-shot criteria: magnitude ignores data, so its
spread over seeds is 0 by construction; taylor/fairgrape/conflict vary only through the subsample;
bilevel and fine-tuning also use the seed for data order and their internal train/validation split.

Target: at sparsity 0.9, FairGRAPE's std_delta at most half of magnitude's, and its overall accuracy
within 1 point of taylor's (not more than 1 point below). A verdict line per fixture says whether the
means meet it.

Main table: unstructured (per-weight) pruning, per-layer scope (the FairGRAPE paper's), one shot and no
fine-tuning, so the table compares the criteria themselves; the paper prunes iteratively (10 % of the
remaining weights per step) and retrains between steps and after, for every method it compares.
`--finetune-epochs N` fine-tunes every method; `--iterations T --step-epochs M` runs the paper's cycle
(T nested steps, M fine-tuning epochs between them, importance recomputed on the retrained model);
`--repair balanced|plain` adds the statistics repair after each step (what BatchNorm does for the paper's
models while they retrain; the exported CNNs have it folded away).
`fairgrape+damp` is FairGRAPE with `--damping` (10 unless `--damping` says otherwise; criteria.damped).
`--structured` gives the second table: channel pruning at 0.3/0.5 with 2 fine-tuning epochs for
magnitude, taylor and fairgrape on adult_mlp and mobilenet_digits.

    python bench/bench_methods.py --out results.json             # main table (long on 2 cores)
    python bench/bench_methods.py --structured --out struct.json
    python bench/bench_methods.py --quick                         # one seed, one sparsity: smoke run
    python bench/bench_methods.py --models adult_mlp --methods magnitude,fairgrape --seeds 0,1

With `--out`, rows are written after every run and a rerun with the same `--out` skips the runs already
there, so an interrupted bench resumes. `--from-json F` only prints the tables of a results file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnxfair.finetune import LOSSES  # noqa: E402
from onnxfair.data import GroupedDataset, load_dataset  # noqa: E402
from onnxfair.prune import PruneConfig, prune_model, versions  # noqa: E402

FIXTURES = {
    # name: (model file, data prefix, group attribute)
    "adult_mlp": ("adult_mlp.onnx", "adult", "race"),
    "resnet_digits": ("resnet_digits.onnx", "digits", "tone"),
    "mobilenet_digits": ("mobilenet_digits.onnx", "digits", "tone"),
}
# label: (PruneConfig.method, scoring loss)
METHODS = {
    "magnitude": ("magnitude", "ce"),
    "taylor": ("taylor", "ce"),
    "fairgrape": ("fairgrape", "ce"),
    "fairgrape+damp": ("fairgrape", "ce"),  # with --damping (criteria.damped)
    "taylor+pw": ("taylor", "pw"),
    "conflict": ("conflict", "ce"),
    "bilevel": ("bilevel", "ce"),
}
CALIB_FRACTION = 0.8
COLLAPSED = 0.95  # class-wise max discrepancy at or above this: the model predicts (nearly) one class


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma list of " + ", ".join(FIXTURES))
    p.add_argument("--methods", default=None, help="comma list of " + ", ".join(METHODS))
    p.add_argument("--sparsities", default=None, help="comma list of fractions removed")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2)")
    p.add_argument("--structured", action="store_true", help="channel pruning with fine-tuning (second table)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default 0 unstructured, 2 structured")
    p.add_argument("--bilevel-steps", type=int, default=100)
    p.add_argument("--iterations", default="1",
                   help="prune in N nested steps, importance recomputed each step (bilevel always runs once); "
                        "'paper': 10%% of the remaining weights per step")
    p.add_argument("--step-epochs", type=int, default=0,
                   help="with --iterations: fine-tune this many epochs between steps (the FairGRAPE paper's cycle)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"])
    p.add_argument("--repair", default="none", choices=["none", "balanced", "plain"],
                   help="statistics repair after selection, before any fine-tuning (onnxfair prune --repair)")
    p.add_argument("--patience", type=int, default=0,
                   help="onnxfair prune --patience; 0 (every epoch runs) is how the committed tables were measured")
    p.add_argument("--finetune-loss", default="ce", choices=LOSSES,
                   help="loss of the fine-tuning epochs, every method alike (onnxfair prune --finetune-loss)")
    p.add_argument("--damping", type=float, default=10.0,
                   help="the fairgrape+damp variant's --damping (fairgrape itself runs the paper's, 0)")
    p.add_argument("--calib-fraction", type=float, default=CALIB_FRACTION,
                   help="seeded, group-stratified share of the calibration split each run prunes with (1: all)")
    p.add_argument("--eval-split", default="eval", choices=["eval", "holdout"],
                   help="judge on fixtures/<data>_eval.npz or, Adult only, the larger adult_holdout.npz")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="sparsity the verdict is judged at (default 0.9 unstructured, the highest run structured)")
    p.add_argument("--quick", action="store_true", help="one seed, one sparsity: a smoke run")
    p.add_argument("--out", default=None, help="write raw per-run rows here (JSON); resumes from it")
    p.add_argument("--markdown", default=None, help="also write the markdown tables and verdicts here")
    p.add_argument("--from-json", default=None, help="print the tables of an existing results file and exit")
    a = p.parse_args(argv)
    if a.structured:
        defaults = dict(models="adult_mlp,mobilenet_digits", methods="magnitude,taylor,fairgrape", sparsities="0.3,0.5")
        a.finetune_epochs = 2 if a.finetune_epochs is None else a.finetune_epochs
    else:
        defaults = dict(models=",".join(FIXTURES), methods=",".join(METHODS), sparsities="0.5,0.7,0.9")
        a.finetune_epochs = 0 if a.finetune_epochs is None else a.finetune_epochs
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.iterations != "paper" and not (a.iterations.isdigit() and int(a.iterations) >= 1):
        raise SystemExit(f"--iterations: a step count (1 or more) or 'paper', not {a.iterations!r}")
    a.models = _names(a.models, FIXTURES, "--models")
    a.methods = _names(a.methods, METHODS, "--methods")
    a.sparsities = [float(s) for s in a.sparsities.split(",") if s.strip()]
    a.seeds = [int(s) for s in (a.seeds or "0,1,2").split(",") if s.strip()]
    if a.target_sparsity is None:
        a.target_sparsity = max(a.sparsities) if a.structured else 0.9
    if a.quick:
        a.seeds = a.seeds[:1]
        a.sparsities = [a.target_sparsity if a.target_sparsity in a.sparsities else a.sparsities[-1]]
    return a


def _names(text: str, known: dict, flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    return names


# --------------------------------------------------------------------------------------------- runs


def run_key(r: dict) -> tuple:
    return (r["model"], r["method"], r["structured"], r["scope"], float(r["sparsity"]), int(r["seed"]),
            int(r["finetune_epochs"]), int(r["bilevel_steps"]) if r["method"] == "bilevel" else 0,
            float(r.get("calib_fraction", CALIB_FRACTION)), r.get("eval_split", "eval"), int(r.get("iterations", 1)),
            int(r.get("step_epochs", 0)), r.get("repair", "none"), float(r.get("damping", 0.0)),
            r.get("finetune_loss", "ce"))


def damping(method: str, args: argparse.Namespace) -> float:
    return args.damping if method.endswith("+damp") else 0.0


def schedule(criterion: str, sparsity: float, args: argparse.Namespace) -> dict:
    """iterations and step_epochs of one run. bilevel always runs once; `--iterations paper` removes 10 %
    of the remaining weights per step, as the FairGRAPE paper does (ceil(log(1 - s) / log 0.9) steps)."""
    if criterion == "bilevel":
        return {"iterations": 1, "step_epochs": 0}
    if args.iterations == "paper":
        its = max(1, math.ceil(math.log(1.0 - sparsity) / math.log(0.9) - 1e-9))
    else:
        its = int(args.iterations)
    return {"iterations": its, "step_epochs": args.step_epochs if its > 1 else 0}


def calib_subsample(calib: GroupedDataset, seed: int, fraction: float = CALIB_FRACTION) -> GroupedDataset:
    """Seeded `fraction` of the calibration split, stratified by group (the rest is left unused)."""
    if fraction >= 1.0:
        return calib
    kept, _ = calib.split(1.0 - fraction, seed=seed)
    return kept


def one_run(model: onnx.ModelProto, calib: GroupedDataset, eval_ds: GroupedDataset, name: str, method: str,
            sparsity: float, seed: int, args: argparse.Namespace) -> dict:
    base, loss = METHODS[method]
    steps = schedule(base, sparsity, args)
    fine_tunes = args.finetune_epochs or steps["step_epochs"]
    cfg = PruneConfig(
        method=base, loss=loss, structured=args.structured, sparsity=sparsity, scope=args.scope, seed=seed,
        finetune_epochs=args.finetune_epochs, latency=False, device="cpu",
        **({"bilevel_steps": args.bilevel_steps} if base == "bilevel" else {}),
        repair=args.repair, damping=damping(method, args), finetune_loss=args.finetune_loss,
        **steps, **({"finetune_patience": args.patience} if fine_tunes else {}),
    )
    fit = calib_subsample(calib, seed, args.calib_fraction)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = prune_model(model, fit, eval_ds, cfg).report
    seconds = time.perf_counter() - t0
    deg, dense, pruned = rep["degradation"], rep["dense"], rep["pruned"]
    return {
        "model": name, "method": method, "criterion": base, "loss": loss, "structured": args.structured,
        "scope": args.scope, "sparsity": sparsity, "seed": seed, "finetune_epochs": args.finetune_epochs,
        "bilevel_steps": args.bilevel_steps if base == "bilevel" else 0, "calib_fraction": args.calib_fraction,
        "eval_split": args.eval_split, **schedule(base, sparsity, args), "repair": args.repair,
        "damping": damping(method, args), "finetune_loss": args.finetune_loss,
        "n_calib": len(fit), "n_eval": len(eval_ds),
        "dense_accuracy": dense["overall"]["accuracy"], "accuracy": pruned["overall"]["accuracy"],
        "std_delta": deg["std_delta"], "max_excess_gap": deg["max_excess_gap"],
        "overall_delta": deg["overall_delta"], "group_deltas": deg["groups"],
        "dense_groups": {k: v["accuracy"] for k, v in dense["groups"].items()},
        "pruned_groups": {k: v["accuracy"] for k, v in pruned["groups"].items()},
        "classwise_max_discrepancy": pruned["classwise"]["max_discrepancy"],
        "params_ratio": rep["cost"].get("params_ratio"), "macs_ratio": rep["cost"].get("macs_ratio"),
        "achieved_sparsity": rep["structure"].get("weights", {}).get("sparsity"),
        "seconds": round(seconds, 2), "timing": rep["timing"],
    }


def save(path: str, args: argparse.Namespace, rows: list[dict]) -> None:
    doc = {"bench": "bench_methods", "versions": versions(), "calib_fraction": args.calib_fraction,
           "argv": sys.argv[1:], "rows": rows}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def run_all(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    if args.out and Path(args.out).exists():
        rows = json.loads(Path(args.out).read_text())["rows"]
        print(f"resuming: {len(rows)} runs already in {args.out}", flush=True)
    done = {run_key(r) for r in rows}
    models, data = {}, {}
    for name in args.models:
        file, prefix, attr = FIXTURES[name]
        models[name] = onnx.load(str(ROOT / "fixtures" / file))
        data[name] = tuple(
            load_dataset(ROOT / "fixtures" / f"{prefix}_{split}.npz", models[name], attr) for split in ("calib", args.eval_split)
        )
    plan = [(m, n, s, seed) for m in args.methods for n in args.models for s in args.sparsities for seed in args.seeds]
    t_start = time.perf_counter()
    for i, (method, name, sparsity, seed) in enumerate(plan, 1):
        probe = {"model": name, "method": method, "structured": args.structured, "scope": args.scope,
                 "sparsity": sparsity, "seed": seed, "finetune_epochs": args.finetune_epochs,
                 "bilevel_steps": args.bilevel_steps, "calib_fraction": args.calib_fraction,
                 "eval_split": args.eval_split, "repair": args.repair, "damping": damping(method, args),
                 "finetune_loss": args.finetune_loss, **schedule(METHODS[method][0], sparsity, args)}
        if run_key(probe) in done:
            continue
        row = one_run(models[name], *data[name], name, method, sparsity, seed, args)
        rows.append(row)
        done.add(run_key(row))
        print(f"[{i}/{len(plan)} {time.perf_counter() - t_start:7.0f}s] {name:16s} {method:14s} s={sparsity:.2f} "
              f"seed={seed}  acc {100 * row['accuracy']:6.2f}  std_delta {100 * row['std_delta']:6.2f}  "
              f"psi {100 * row['max_excess_gap']:6.2f}  ({row['seconds']:.1f}s)", flush=True)
        if args.out:
            save(args.out, args, rows)
    return rows


# ------------------------------------------------------------------------------------------- tables


def _ms(vals: list[float]) -> tuple[float, float | None]:
    a = 100 * np.asarray(vals, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def labels(rows: list[dict]) -> list[str]:
    """Each row's method as tabulated. Runs of one method with different --damping values (a --from-json file
    may hold several) get `<method> C=<value>`, and so does a damped run of a method named without `+damp`,
    so that different settings are never pooled into one cell or read as the paper's FairGRAPE."""
    damps: dict[str, set[float]] = {}
    for r in rows:
        damps.setdefault(r["method"], set()).add(float(r.get("damping", 0.0)))

    def label(r: dict) -> str:
        d, m = float(r.get("damping", 0.0)), r["method"]
        return f"{m} C={d:g}" if len(damps[m]) > 1 or (d != 0.0 and not m.endswith("+damp")) else m
    return [label(r) for r in rows]


def aggregate(rows: list[dict]) -> dict:
    """(model, method label, sparsity) -> mean/std of accuracy, std_delta, psi in points, seeds, collapsed count."""
    cells: dict[tuple, list[dict]] = {}
    for r, label in zip(rows, labels(rows)):
        cells.setdefault((r["model"], label, float(r["sparsity"])), []).append(r)
    out = {}
    for key, rs in cells.items():
        out[key] = {
            "accuracy": _ms([r["accuracy"] for r in rs]),
            "std_delta": _ms([r["std_delta"] for r in rs]),
            "max_excess_gap": _ms([r["max_excess_gap"] for r in rs]),
            "seeds": len(rs),
            "collapsed": sum((r["classwise_max_discrepancy"] or 0) >= COLLAPSED for r in rs),
            "seconds": float(np.mean([r["seconds"] for r in rs])),
        }
    return out


def verdict(agg: dict, model: str, sparsity: float, fair: str = "fairgrape") -> str:
    """The target at `sparsity`: FairGRAPE (`fair`: the paper's or the damped variant) std_delta <= 0.5 x
    magnitude's; accuracy >= taylor's - 1 point."""
    f, m, t = (agg.get((model, k, sparsity)) for k in (fair, "magnitude", "taylor"))
    head = (f"{model} @ {sparsity:g}" + ("" if sparsity == 0.9 else " (the 0.9 target's rule, applied here)")
            + ("" if fair == "fairgrape" else f", {fair}") + ": ")
    if f is None:
        return head + f"no {fair} runs"
    parts, met = [], []
    if m is not None:
        fs, ms = f["std_delta"][0], m["std_delta"][0]
        ratio = fs / ms if ms > 0 else float("inf")
        ok = ratio <= 0.5
        met.append(ok)
        parts.append(f"std_delta {fair}/magnitude = {fs:.2f}/{ms:.2f} = {ratio:.2f} "
                     f"(target <= 0.50: {'met' if ok else f'NOT met, {ratio / 0.5:.1f}x the allowed ratio'})")
    if t is not None:
        diff = f["accuracy"][0] - t["accuracy"][0]
        ok = diff >= -1.0
        met.append(ok)
        parts.append(f"accuracy {fair} - taylor = {diff:+.2f} pts "
                     f"(target >= -1.00: {'met' if ok else f'NOT met by {-1.0 - diff:.2f} pts'})")
    if not parts:
        return head + "no magnitude/taylor runs to compare with"
    collapsed = [k for k in (fair, "magnitude", "taylor")
                 if agg.get((model, k, sparsity)) and agg[(model, k, sparsity)]["collapsed"]]
    tail = f"; collapsed to ~one class: {', '.join(collapsed)}" if collapsed else ""
    if f["collapsed"]:  # a model predicting one class spreads group accuracy by base rates: nothing to credit
        met.append(False)
        tail += f" (a collapsed {fair} run cannot meet the target)"
    return head + "; ".join(parts) + f" -> target {'MET' if all(met) else 'NOT MET'}{tail}"


def dense_line(rows: list[dict], model: str) -> str:
    r = next(r for r in rows if r["model"] == model)
    groups = ", ".join(f"{k} {100 * v:.2f}" for k, v in r["dense_groups"].items())
    return f"dense accuracy {100 * r['dense_accuracy']:.2f}% (n={r['n_eval']}; {groups})"


def caption(rows: list[dict]) -> str:
    r = rows[0]
    kind = "structured (channels)" if r["structured"] else "unstructured (weights)"
    ft_loss = r.get("finetune_loss", "ce")
    ft = (f", fine-tuned {r['finetune_epochs']} epochs" + (f" ({ft_loss} loss)" if ft_loss != "ce" else "")
          if r["finetune_epochs"] else ", no fine-tuning")
    its = sorted({int(x.get("iterations", 1)) for x in rows if x["method"] != "bilevel"} or {1})
    between = max(int(x.get("step_epochs", 0)) for x in rows)
    counts = f"{its[0]}" if len(its) == 1 else f"{', '.join(map(str, its))} (10 % of the remaining weights each)"
    steps = f", {counts} nested steps (importance recomputed each step" + (
        f", {between} fine-tuning epochs between steps)" if between else ")")
    ft = (steps if its[-1] > 1 else ", one shot") + ft
    repair = r.get("repair", "none")
    ft += f", {repair} statistics repair" if repair != "none" else ""
    steps = sorted({x["bilevel_steps"] for x in rows if x["method"] == "bilevel"})
    bl = f"; bilevel {', '.join(map(str, steps))} steps" if steps else ""
    damps = sorted({float(x.get("damping", 0.0)) for x in rows if x["method"].endswith("+damp")})
    bl += f"; fairgrape+damp is fairgrape with --damping {', '.join(f'{d:g}' for d in damps)}" if damps else ""
    seeds = sorted({x["seed"] for x in rows})
    frac = float(r.get("calib_fraction", CALIB_FRACTION))
    share = "all of the calibration split" if frac >= 1.0 else (
        f"a seeded, group-stratified {frac:.0%} subsample of the calibration split")
    judge = ("the holdout split (every test row outside the calibration split)"
             if r.get("eval_split", "eval") == "holdout" else "the evaluation split")
    return (f"{kind}, {r['scope']} scope{ft}{bl}. Each run prunes with {share} "
            f"(seed also seeds the method) and is judged on {judge}; "
            f"mean ± sample std over seeds {', '.join(map(str, seeds))}. "
            + ("magnitude ignores the data, so its std over seeds is 0. " if not r["finetune_epochs"] else "")
            + "std_delta = sample std of per-group accuracy "
            "change, max_excess_gap = ψ, both in accuracy points. 'collapsed' counts seeds whose pruned model "
            f"predicts nearly one class (class-wise recall spread ≥ {COLLAPSED}).")


def render(rows: list[dict], target: float) -> tuple[str, str]:
    """Plain-text and markdown tables per fixture, with verdict lines."""
    agg = aggregate(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    present = set(labels(rows))
    methods = [x for m in METHODS for x in sorted(present, key=lambda x: float(x.partition(" C=")[2] or -1))
               if x.partition(" C=")[0] == m]
    sparsities = sorted({float(r["sparsity"]) for r in rows})
    text, md = [], [f"_{caption(rows)}_", ""]
    header = ["method", "sparsity", "accuracy %", "std_delta pts", "max_excess_gap pts", "collapsed", "s/run"]
    verdicts = []
    for model in models:
        body = []
        for s in sparsities:
            for m in methods:
                c = agg.get((model, m, s))
                if c is None:
                    continue
                body.append([m, f"{s:g}", _fmt(*c["accuracy"]), _fmt(*c["std_delta"]), _fmt(*c["max_excess_gap"]),
                             f"{c['collapsed']}/{c['seeds']}", f"{c['seconds']:.0f}"])
        title = f"{model} (groups: {FIXTURES[model][2]})"
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
        text += ["", title, dense_line(rows, model), "  ".join(h.rjust(w) for h, w in zip(header, widths)),
                 "  ".join("-" * w for w in widths)]
        text += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
        md += [f"**{title}** — {dense_line(rows, model)}", "", "| " + " | ".join(header) + " |",
               "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        md += ["| " + " | ".join(b) + " |" for b in body] + [""]
        vs = target if target in sparsities else max(sparsities)
        verdicts += [verdict(agg, model, vs, fair) for fair in methods
                     if fair == "fairgrape" or (fair.startswith("fairgrape") and (model, fair, vs) in agg)]
    text += ["", "Target (FairGRAPE std_delta <= 0.5 x magnitude's; accuracy within 1 pt of taylor's):"]
    text += ["  " + v for v in verdicts]
    md += ["Verdicts (target: FairGRAPE std_delta ≤ 0.5 × magnitude's; accuracy ≥ taylor's − 1 pt):", ""]
    md += [f"- {v}" for v in verdicts]
    return "\n".join(text), "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
    else:
        rows = run_all(args)
        keys = {(n, m, s, seed) for m in args.methods for n in args.models for s in args.sparsities for seed in args.seeds}
        rows = [r for r in rows if (r["model"], r["method"], float(r["sparsity"]), r["seed"]) in keys
                and r["structured"] == args.structured and r["scope"] == args.scope
                and float(r.get("calib_fraction", CALIB_FRACTION)) == args.calib_fraction
                and r.get("eval_split", "eval") == args.eval_split and r.get("repair", "none") == args.repair
                and float(r.get("damping", 0.0)) == damping(r["method"], args)
                and r.get("finetune_loss", "ce") == args.finetune_loss
                and {"iterations": int(r.get("iterations", 1)), "step_epochs": int(r.get("step_epochs", 0))}
                == schedule(r["criterion"], float(r["sparsity"]), args)]
    if not rows:
        raise SystemExit("no runs to tabulate")
    text, md = render(rows, args.target_sparsity)
    print(text)
    print("\n--- markdown ---\n")
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")


if __name__ == "__main__":
    main()
