"""Pictures of a sweep: the accuracy/disparity Pareto plot, per-group bars, and a self-contained HTML report.

matplotlib is an optional extra (`onnxfair[plot]`), imported only here and only when a picture is drawn. The
figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing global changes in the caller.
The HTML page embeds its images as base64 data URIs and its CSS inline: it opens offline and can be mailed.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Sequence

from onnxfair.errors import OnnxfairError

DISPARITY_AXIS = {
    "std_delta": "disparity of degradation: sample std (n−1) of Δ_g over groups",
    "max_excess_gap": "max excess accuracy gap ψ = max_g (drop_g − overall drop)",
    "accuracy_gap": "accuracy gap of the pruned model, max_g Acc_g − min_g Acc_g",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def require_matplotlib():
    """The matplotlib module, or a one-line error naming the extra to install."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise OnnxfairError(
            "plots need matplotlib: pip install 'onnxfair[plot]' (or pass --no-plots)"
        ) from None
    return matplotlib


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    """PNG via a temporary file and a rename, like every other output."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    from onnxfair import __version__

    fig.savefig(tmp, format="png", metadata={"Software": f"onnxfair {__version__}"})  # marks it as a sweep's own
    os.replace(tmp, target)
    return target


def pareto_png(rows: Sequence[dict], metric: str, path: str | os.PathLike, title: str = "") -> Path:
    """Pruned accuracy against disparity, one point per run: marker = method, colour = MACs kept (or the
    sparsity when every run keeps the same MACs, as unstructured runs do).

    The Pareto front is ringed and joined by a line, the recommended run has a thick ring, the dense accuracy is
    a dashed line. When a few poor runs stretch the axes so that the front is squeezed into a corner, a second
    panel zooms in on the front's neighbourhood (the first still shows every run).
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    pts = [r for r in rows if r.get(metric) is not None and r.get("accuracy") is not None]
    if not pts:  # a figure that says why, rather than empty axes under a colour bar of made-up values
        fig = _figure(8.0, 3.0)
        fig.text(0.5, 0.5, f"No run has a value for {metric} to plot:\nit needs at least "
                 "two groups with rows in the evaluation data.", ha="center", va="center", fontsize=11)
        return _save(fig, path)
    ratios = [r["macs_ratio"] for r in pts]
    colour, colour_label = "macs_ratio", "MACs kept (pruned / dense)"
    if max(ratios) - min(ratios) < 1e-9:  # unstructured: zeros leave MACs unchanged, so colour by sparsity
        colour, colour_label = "sparsity", f"sparsity (fraction removed; MACs ratio {ratios[0]:.3f} for every run)"
    values = [r[colour] for r in pts]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    # light = little removed in both cases: MACs kept runs up with it, sparsity down
    cmap = colormaps["viridis" if colour == "macs_ratio" else "viridis_r"]
    style = {"metric": metric, "norm": Normalize(vmin=lo, vmax=hi), "cmap": cmap, "colour": colour,
             "methods": list(dict.fromkeys(r["method"] for r in pts))}
    box = _zoom_box(pts, metric)
    fig = _figure(13.0 if box else 8.0, 6.2)
    axes = fig.subplots(1, 2) if box else [fig.add_subplot()]
    handles = _draw_runs(axes[0], pts, style)
    axes[0].set_title(title or f"Accuracy against disparity, {len(pts)} runs", fontsize=10)
    if box:
        inside = [r for r in pts if box[0] <= 100 * r[metric] <= box[1] and box[2] <= 100 * r["accuracy"] <= box[3]]
        _draw_runs(axes[1], inside, style, limits=box)
        axes[1].set_title(f"Zoom on the Pareto front ({len(inside)} of {len(pts)} runs)", fontsize=10)
        axes[0].indicate_inset((box[0], box[2], box[1] - box[0], box[3] - box[2]), edgecolor="0.5", alpha=0.6)
    for ax in axes:
        ax.set_xlabel(f"{DISPARITY_AXIS.get(metric, metric)}\n(accuracy points; lower is fairer)", fontsize=9)
        ax.set_ylabel("pruned accuracy (%; higher is better)", fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.colorbar(cmap_mappable(style["cmap"], style["norm"]), ax=list(axes), label=colour_label)
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
    return _save(fig, path)


def _zoom_box(pts: Sequence[dict], metric: str) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) in points around the runs that are not outliers (Tukey fences: accuracy below
    Q1 - 1.5 IQR or disparity above Q3 + 1.5 IQR) plus the whole front; None when no zoom is needed."""
    import numpy as np

    if len(pts) < 5:
        return None
    acc = np.array([100 * r["accuracy"] for r in pts])
    dis = np.array([100 * r[metric] for r in pts])
    qa1, qa3 = np.percentile(acc, [25, 75])
    qd1, qd3 = np.percentile(dis, [25, 75])
    keep = [(a >= qa1 - 1.5 * (qa3 - qa1) and d <= qd3 + 1.5 * (qd3 - qd1)) or r.get("pareto")
            for a, d, r in zip(acc, dis, pts)]
    if all(keep):
        return None
    dense = [100 * r["dense_accuracy"] for r in pts if r.get("dense_accuracy") is not None]
    x0, x1 = dis[keep].min(), dis[keep].max()
    y0, y1 = acc[keep].min(), max([acc[keep].max()] + dense)
    full_w, full_h = dis.max() - dis.min(), max([acc.max()] + dense) - acc.min()
    if (x1 - x0) > 0.6 * full_w and (y1 - y0) > 0.6 * full_h:
        return None
    w, h = max(x1 - x0, 0.05 * full_w, 1e-3), max(y1 - y0, 0.05 * full_h, 1e-3)
    return x0 - 0.08 * w, x1 + 0.08 * w, y0 - 0.08 * h, y1 + 0.08 * h


def _draw_runs(ax, pts: Sequence[dict], style: dict, limits: tuple[float, float, float, float] | None = None) -> list:
    """Scatter, front, recommendation and dense line on one axis; returns the legend handles."""
    from matplotlib.lines import Line2D

    metric = style["metric"]
    handles = []
    for k, m in enumerate(style["methods"]):
        mine = [r for r in pts if r["method"] == m]
        marker = MARKERS[k % len(MARKERS)]
        if mine:
            ax.scatter([100 * r[metric] for r in mine], [100 * r["accuracy"] for r in mine],
                       c=[r[style["colour"]] for r in mine], cmap=style["cmap"], norm=style["norm"], marker=marker, s=70,
                       edgecolors="black", linewidths=0.6, zorder=3)
        handles.append(Line2D([], [], marker=marker, linestyle="", color="0.55", markeredgecolor="black",
                              markersize=8, label=m))
    if len(pts) <= 40:
        for r in pts:
            ax.annotate(f"s{r['sparsity']:g}", (100 * r[metric], 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(6, -10), fontsize=7, color="0.3")
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: (r[metric], r["accuracy"]))
    if front:
        ax.plot([100 * r[metric] for r in front], [100 * r["accuracy"] for r in front], color="tab:red",
                linewidth=1.2, linestyle="-", alpha=0.7, zorder=2)
        ax.scatter([100 * r[metric] for r in front], [100 * r["accuracy"] for r in front], s=150,
                   facecolors="none", edgecolors="tab:red", linewidths=1.0, zorder=2)
    handles.append(Line2D([], [], color="tab:red", alpha=0.7, marker="o", markerfacecolor="none",
                          markersize=10, label="Pareto front"))
    dense = sorted({r["dense_accuracy"] for r in pts if r.get("dense_accuracy") is not None})
    if dense:
        mean = sum(dense) / len(dense)
        ax.axhline(100 * mean, color="0.4", linestyle="--", linewidth=1, zorder=1)
        label = f"dense accuracy {100 * mean:.2f}%" + (" (mean over seeds' eval splits)" if len(dense) > 1 else "")
        handles.append(Line2D([], [], color="0.4", linestyle="--", label=label))
    if metric == "accuracy_gap":
        dg = [(r["dense_accuracy_gap"], r["dense_accuracy"]) for r in pts if r.get("dense_accuracy_gap") is not None]
        if dg:
            ax.scatter([100 * g for g, _ in dg], [100 * a for _, a in dg], marker="*", s=160, color="0.2", zorder=3)
            handles.append(Line2D([], [], marker="*", linestyle="", color="0.2", markersize=11, label="dense model"))
    if limits:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
    (xa, xb), (ya, yb) = ax.get_xlim(), ax.get_ylim()
    for r in (r for r in pts if r.get("recommended")):
        x, y = 100 * r[metric], 100 * r["accuracy"]
        ax.scatter([x], [y], s=380, facecolors="none", edgecolors="tab:red", linewidths=2.2, zorder=4)
        right, top = (x - xa) > 0.6 * (xb - xa), (y - ya) > 0.5 * (yb - ya)  # put the label towards the middle
        ax.annotate(f"recommended:\n{r['run_id']}", (x, y), xytext=(-30 if right else 30, -45 if top else 40),
                    textcoords="offset points", fontsize=8, color="tab:red", weight="bold",
                    ha="right" if right else "left", va="top" if top else "bottom",
                    arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 1},
                    bbox={"boxstyle": "round", "fc": "white", "ec": "tab:red", "alpha": 0.85}, zorder=5)
    handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="tab:red",
                          markeredgewidth=2, markersize=13, label="recommended"))
    return handles


def cmap_mappable(cmap, norm):
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=norm, cmap=cmap)
    sm.set_array([])
    return sm


def groups_png(report: dict, path: str | os.PathLike, name: str = "pruned") -> Path:
    """Per-group accuracy of the dense and the pruned model side by side, Δ in points above each pair."""
    dense, pruned = report["dense"]["groups"], report["pruned"]["groups"]
    labels = [g for g in dense if dense[g]["accuracy"] is not None]
    fig = _figure(max(6.0, 1.1 * len(labels) + 2.5), 4.8)
    ax = fig.add_subplot()
    xs = range(len(labels))
    width = 0.38
    da = [100 * dense[g]["accuracy"] for g in labels]
    pa = [100 * (pruned[g]["accuracy"] or 0.0) for g in labels]
    ax.bar([x - width / 2 for x in xs], da, width, label="dense", color="0.65", edgecolor="black", linewidth=0.5)
    ax.bar([x + width / 2 for x in xs], pa, width, label=name, color="tab:blue", edgecolor="black", linewidth=0.5)
    for x, a, b in zip(xs, da, pa):
        ax.annotate(f"{b - a:+.1f}", (x, max(a, b)), textcoords="offset points", xytext=(0, 3), ha="center",
                    fontsize=8, color="tab:red" if b < a else "tab:green")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{g}\n(n={dense[g]['n']})" for g in labels], fontsize=8,
                       rotation=0 if len(labels) <= 6 else 30, ha="center" if len(labels) <= 6 else "right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 108)
    overall = (100 * report["dense"]["overall"]["accuracy"], 100 * report["pruned"]["overall"]["accuracy"])
    ax.set_title(f"Per-group accuracy: dense vs {name}\noverall {overall[0]:.2f}% → {overall[1]:.2f}% "
                 "(bar labels: Δ_g in accuracy points)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f2f2f2}
td.l,th.l{text-align:left}tr.front td{background:#fff6e6}tr.rec td{background:#ffe0cc;font-weight:bold}
img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 .2em}
.note{color:#555;font-size:.9em}
"""


_LEFT = " class='l'"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _cell(v, kind: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if kind == "pct":
        return f"{100 * v:.2f}"
    if kind == "ratio":
        return f"{v:.3f}"
    if kind == "ms":
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


_COLUMNS = (
    ("run_id", "run", ""), ("method", "method", ""), ("sparsity", "sparsity", ""), ("seed", "seed", ""),
    ("accuracy", "acc %", "pct"), ("dense_accuracy", "dense acc %", "pct"), ("accuracy_delta", "Δacc pts", "pct"),
    ("std_delta", "std Δ_g pts", "pct"), ("max_excess_gap", "ψ pts", "pct"), ("range_delta", "range Δ_g pts", "pct"),
    ("worst_group_accuracy", "worst group %", "pct"), ("accuracy_gap", "acc gap pts", "pct"),
    ("macs", "MACs", ""), ("macs_ratio", "MACs ratio", "ratio"), ("bytes", "bytes", ""),
    ("latency_ms", "latency ms", "ms"), ("pareto", "front", ""), ("recommended", "recommended", ""),
)


def html_report(summary: dict, path: str | os.PathLike, images: dict[str, bytes] | None = None) -> Path:
    """One HTML file: settings, recommendation, results table, embedded PNGs; no external requests."""
    from onnxfair.model import write_text_atomic

    images = images or {}
    s, rec = summary["settings"], summary["recommendation"]
    disp = summary["disparity"]
    rows = summary["rows"]
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>onnxfair sweep</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>onnxfair sweep: {e(str(s['model']))}</h1>",
        f"<p>{len(rows)} runs: methods {e(', '.join(s['methods']))}; sparsities "
        f"{e(', '.join(f'{v:g}' for v in s['sparsities']))}; seeds {e(', '.join(str(v) for v in s['seeds']))}; "
        f"{'structured' if s['prune'].get('structured', True) else 'unstructured'}.</p>",
        "<h2>Recommendation</h2>",
    ]
    if rec["run_id"]:
        r = next(x for x in rows if x["run_id"] == rec["run_id"])
        parts.append(
            f"<p><b>{e(rec['run_id'])}</b>: accuracy {100 * r['accuracy']:.2f}% (dense {100 * r['dense_accuracy']:.2f}%), "
            f"{e(disp['metric'])} {_cell(r[disp['metric']], 'pct')} pts, MACs ratio {r['macs_ratio']:.3f}"
            f"{'' if r['latency_ms'] is None else ', latency ' + format(r['latency_ms'], '.3f') + ' ms'}. "
            f"Chosen as {e(rec['why'])}.</p>"
        )
    else:
        parts.append(f"<p><b>No recommendation</b>: {e(rec['why'])}.</p>")
    parts.append(f"<p class='note'>Rule: {e(rec['rule'])}</p>")
    if "pareto" in images:
        parts += ["<h2>Accuracy against disparity</h2>",
                  f"<img alt='Pareto plot' src='{_data_uri(images['pareto'])}'>",
                  f"<p class='note'>Disparity: <code>{e(disp['metric'])}</code> = {e(disp['definition'])}. "
                  f"{e(summary['pareto'])}.</p>"]
    if "groups" in images:
        parts += ["<h2>Per-group accuracy of the recommended run</h2>",
                  f"<img alt='Per-group accuracy' src='{_data_uri(images['groups'])}'>"]
    parts += ["<h2>Results</h2>", "<table><tr>"
              + "".join(f"<th{_LEFT if k in ('run_id', 'method') else ''}>{e(h)}</th>" for k, h, _ in _COLUMNS)
              + "</tr>"]
    for r in rows:
        cls = "rec" if r["recommended"] else "front" if r["pareto"] else ""
        parts.append(f"<tr class='{cls}'>" if cls else "<tr>")
        parts[-1] += "".join(
            f"<td{_LEFT if k in ('run_id', 'method') else ''}>{_cell(r[k], kind)}</td>" for k, _, kind in _COLUMNS
        ) + "</tr>"
    parts.append("</table>")
    parts.append("<p class='note'>Percentages and points are of accuracy (1 pt = 0.01). Highlighted: the Pareto "
                 "front; bold: the recommended run.</p>")
    parts += ["<h2>Settings</h2>", "<table>"]
    settings = {k: v for k, v in s.items() if k not in ("prune", "versions")}
    settings.update({f"prune.{k}": v for k, v in s["prune"].items()})
    settings.update({f"versions.{k}": v for k, v in (s.get("versions") or {}).items()})
    for k, v in settings.items():
        parts.append(f"<tr><th class='l'>{e(k)}</th><td class='l'>{e(str(v))}</td></tr>")
    parts.append("</table>")
    if summary.get("conventions"):
        parts += ["<h2>Metric conventions</h2>", "<table>"]
        for k, v in summary["conventions"].items():
            parts.append(f"<tr><th class='l'>{e(k)}</th><td class='l'>{e(str(v))}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return write_text_atomic("\n".join(parts) + "\n", path)
