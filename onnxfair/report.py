"""Human-readable renderings of evaluation and comparison blocks (the JSON blocks are the source), and the
JSON-safe form of a report."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_safe(obj: Any) -> Any:
    """`obj` with numpy values as Python ones and every NaN or infinite float as None: JSON has no token for
    them (json.dumps would write NaN, which strict parsers reject), so reports pass allow_nan=False."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _pct(v: float | None) -> str:
    return "   -  " if v is None else f"{100 * v:6.2f}"


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _label_width(groups: dict) -> int:
    return max([len("overall")] + [len(label) for label in groups]) + 2


def format_evaluation(block: dict, title: str = "") -> str:
    """Per-group table plus disparity lines."""
    lines = [title] if title else []
    binary = block.get("binary", False)
    w = _label_width(block["groups"])
    head = f"{'group':<{w}}{'n':>7}{'acc%':>8}"
    if binary:
        head += f"{'sel%':>8}{'tpr%':>8}{'fpr%':>8}"
    lines.append(head)
    lines.append("-" * len(head))
    for label, g in block["groups"].items():
        row = f"{label:<{w}}{g['n']:>7}{_pct(g['accuracy']):>8}"
        if binary:
            row += f"{_pct(g['selection_rate']):>8}{_pct(g['tpr']):>8}{_pct(g['fpr']):>8}"
        if g.get("small"):
            row += "  (small group)"
        lines.append(row)
    lines.append(f"{'overall':<{w}}{block['overall']['n']:>7}{_pct(block['overall']['accuracy']):>8}")
    d = block["disparity"]
    lines.append("")
    lines.append(f"accuracy gap {_pct(d['accuracy_gap']).strip()} pts   worst-group accuracy {_pct(d['worst_group_accuracy']).strip()}%")
    if binary:
        lines.append(
            f"demographic parity difference {_num(d['demographic_parity_difference'])}   "
            f"equalized odds difference {_num(d['equalized_odds_difference'])}"
        )
    cw = block.get("classwise")
    if cw:
        lines.append(f"class-wise accuracy variance {_num(cw['variance'], 5)}   max class discrepancy {_pct(cw['max_discrepancy']).strip()} pts")
    lat = block.get("latency")
    if lat:
        lines.append(
            f"latency {lat['median_ms']:.3f} ms median, {lat['p90_ms']:.3f} ms p90 "
            f"(batch {lat['batch_size']}, {lat['provider']}, {lat['threads']} threads)"
        )
    return "\n".join(lines)


def _resolution(deg: dict) -> str | None:
    """std_delta's 90 % interval and noise floor in words, with what they allow one to conclude."""
    ci, floor, p = deg.get("std_delta_interval"), deg.get("std_delta_noise_floor"), deg.get("std_delta_p_value")
    if ci is None or floor is None or p is None:
        return None
    verdict = (f"a group effect these rows resolve (p = {p:.3f})" if p < 0.05
               else f"these rows cannot tell it from no group effect (p = {p:.2f})")
    return (f"90 % interval {100 * ci['low']:.2f}-{100 * ci['high']:.2f} pts; sampling noise alone gives "
            f"{100 * floor:.2f} pts: {verdict}")


def format_comparison(a: dict, b: dict, deg: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Side-by-side per-group accuracy with Δ, then the degradation summary."""
    w = _label_width(a["groups"])
    head = f"{'group':<{w}}{'n':>7}{name_a[:9]:>10}{name_b[:9]:>10}{'delta':>9}"
    lines = [head, "-" * len(head)]
    for label, g in a["groups"].items():
        gb = b["groups"].get(label, {})
        delta = deg["groups"].get(label)
        lines.append(
            f"{label:<{w}}{g['n']:>7}{_pct(g['accuracy']):>10}{_pct(gb.get('accuracy')):>10}"
            f"{'-' if delta is None else f'{100 * delta:+.2f}':>9}{'  (small group)' if g.get('small') else ''}"
        )
    lines.append(
        f"{'overall':<{w}}{a['overall']['n']:>7}{_pct(a['overall']['accuracy']):>10}"
        f"{_pct(b['overall']['accuracy']):>10}{100 * deg['overall_delta']:>+9.2f}"
    )
    lines.append("")
    lines.append(
        f"std of group deltas {_pct(deg['std_delta']).strip()} pts   range {_pct(deg['range_delta']).strip()} pts   "
        f"max excess accuracy gap {_pct(deg['max_excess_gap']).strip()} pts"
    )
    resolution = _resolution(deg)
    if resolution:
        lines.append(f"std of group deltas: {resolution}")
    gap_a, gap_b = a["disparity"]["accuracy_gap"], b["disparity"]["accuracy_gap"]
    lines.append(f"accuracy gap {_pct(gap_a).strip()} -> {_pct(gap_b).strip()} pts")
    la, lb = a.get("latency"), b.get("latency")
    if la and lb:
        lines.append(
            f"latency {la['median_ms']:.3f} -> {lb['median_ms']:.3f} ms median "
            f"({la['median_ms'] / max(lb['median_ms'], 1e-9):.2f}x, batch {la['batch_size']}, {la['provider']})"
        )
    return "\n".join(lines)


MARKDOWN_TITLE = "# onnxfair "  # how every Markdown summary starts: `--report` replaces only files that do


def weight_updates(structure: dict) -> list[str]:
    """One phrase per weight update a prune run made (bilevel training, repair, fine-tuning), in run order:
    the summary says how the pruned weights came about, not only the structure report."""
    out = []
    b = structure.get("bilevel")
    if b:
        val = f"; binarised val accuracy {_pct(b['val']['accuracy']).strip()} %" if b.get("val") else ""
        out.append(f"bilevel: {b['steps']} joint mask/weight step{'s' * (b['steps'] != 1)} (alpha {b['alpha']:g}{val})")
    r = structure.get("repair")
    if r:
        out.append(f"repair {r['mode']}: {r['layers']} layer{'s' * (r['layers'] != 1)} rescaled"
                   + (f", after each of {r['steps']} steps" if r.get("steps", 1) > 1 else ""))
    steps = structure.get("step_finetune")
    if steps:
        out.append(f"fine-tuned between steps ({len(steps)} times, {steps[0]['loss']} loss)")
    f = structure.get("finetune")
    if f:
        best = f["history"][f["best_epoch"]]
        met = {True: ", constraint met", False: ", constraint NOT met", None: ""}[f.get("constraint_met")]
        out.append(f"fine-tuned {f['epochs_run']} epoch{'s' * (f['epochs_run'] != 1)} ({f['loss']} loss"
                   f"{', stopped early' if f['stopped_early'] else ''}), kept epoch {f['best_epoch']} at val accuracy "
                   f"{_pct(best['val_accuracy']).strip()} %{met}")
    return out


def prune_markdown(report: dict) -> str:
    """A short Markdown summary of a prune report, for humans and pull-request comments."""
    m = report["method"]
    c = report["cost"]
    budget = f"sparsity {m['sparsity']}" if m.get("sparsity") is not None else f"target MACs {m['target_macs']}"
    lines = [
        f"{MARKDOWN_TITLE}prune: {m['method']} ({m['kind']}, {budget}, seed {m['seed']})",
        "",
        "| | dense | pruned | ratio |",
        "|---|---:|---:|---:|",
        f"| MACs | {c['macs_dense']:,} | {c['macs_pruned']:,} | {c['macs_ratio']:.3f} |",
        f"| parameters | {c['params_dense']:,} | {c['params_pruned']:,} | {c['params_ratio']:.3f} |",
        f"| bytes | {c['bytes_dense']:,} | {c['bytes_pruned']:,} | {c['bytes_pruned'] / max(c['bytes_dense'], 1):.3f} |",
    ]
    lat = report.get("latency")
    if lat:
        lines.append(
            f"| latency ms (batch {lat['dense']['batch_size']}) | {lat['dense']['median_ms']:.3f} | "
            f"{lat['pruned']['median_ms']:.3f} | {1 / max(lat['speedup'], 1e-9):.3f} |"
        )
    updates = weight_updates(report.get("structure", {}))
    if updates:
        lines += ["", "Weights: " + "; ".join(updates) + "."]
    if "dense" in report:
        d, p, g = report["dense"], report["pruned"], report["degradation"]
        lines += ["", f"Evaluated on {report['evaluation']['n']} rows ({report['evaluation']['source']}).", "",
                  "| group | n | dense acc % | pruned acc % | Δ pts |", "|---|---:|---:|---:|---:|"]
        for label, row in d["groups"].items():
            pa = p["groups"][label]["accuracy"]
            delta = g["groups"].get(label)
            small = " (small group)" if row.get("small") else ""
            lines.append(
                f"| {label}{small} | {row['n']} | {_pct(row['accuracy']).strip()} | {_pct(pa).strip()} | "
                f"{'-' if delta is None else f'{100 * delta:+.2f}'} |"
            )
        lines.append(
            f"| overall | {d['overall']['n']} | {_pct(d['overall']['accuracy']).strip()} | "
            f"{_pct(p['overall']['accuracy']).strip()} | {100 * g['overall_delta']:+.2f} |"
        )
        lines += [
            "",
            f"std of group deltas (n-1): {_pct(g['std_delta']).strip()} pts; range: {_pct(g['range_delta']).strip()} pts; "
            f"max excess accuracy gap ψ: {_pct(g['max_excess_gap']).strip()} pts; accuracy gap "
            f"{_pct(d['disparity']['accuracy_gap']).strip()} → {_pct(p['disparity']['accuracy_gap']).strip()} pts.",
        ]
        resolution = _resolution(g)
        if resolution:
            lines += ["", f"Std of group deltas: {resolution}."]
    note = report.get("structure", {}).get("note")
    if note:
        lines += ["", f"Note: {note}."]
    if report.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def format_prune(report: dict) -> str:
    """Terminal summary of a prune run."""
    c = report["cost"]
    lines = [
        f"MACs {c['macs_dense']:,} -> {c['macs_pruned']:,} ({c['macs_ratio']:.3f}x)   "
        f"params {c['params_dense']:,} -> {c['params_pruned']:,}   bytes {c['bytes_dense']:,} -> {c['bytes_pruned']:,}"
    ]
    lat = report.get("latency")
    if lat:
        lines.append(
            f"latency {lat['dense']['median_ms']:.3f} -> {lat['pruned']['median_ms']:.3f} ms median "
            f"(speedup {lat['speedup']:.2f}x, batch {lat['dense']['batch_size']}, {lat['dense']['provider']})"
        )
    lines += [f"weights: {u}" for u in weight_updates(report.get("structure", {}))]
    if "dense" in report:
        lines.append("")
        source = report.get("evaluation", {}).get("source", "")
        if source.startswith("held-out"):  # not the user's own evaluation data: say which rows were judged
            lines += [f"judged on {report['evaluation']['n']} rows: the {source}", ""]
        lines.append(format_comparison(report["dense"], report["pruned"], report["degradation"], "dense", "pruned"))
    note = report.get("structure", {}).get("note")
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)
