"""`onnxfair sweep`: a grid of prune runs, the accuracy/disparity Pareto front, plots and an HTML report."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
from pathlib import Path

import click

from cli.options import data_options, image_options, emit_json, load_data, load_model, parse_input_shapes, progress
from cli.outputs import check_outputs
from cli.prune import prune as _prune_command
from onnxfair.errors import UsageError
from onnxfair.prune import PruneConfig
from onnxfair.settings import check_seed
from onnxfair.sweep import (
    DISPARITIES, PLOTS, DataSpec, SweepPlan, check_out, check_recommendation_options, expand, foreign_models,
    format_rows, out_lock, output_files, parse_list, run_sweep, sweep_summary, write_results,
)

UNMET_EXIT = 3  # every output is written, but no run meets --max-disparity / --max-macs-ratio

# Prune settings passed through unchanged. Their options are copied from `onnxfair prune` itself, so names,
# defaults, choices and help stay the same and a sweep row equals a `prune` run with the same flags.
PASS_THROUGH = (
    "scope", "round_to", "iterations", "step_epochs", "repair", "damping", "loss", "beta", "gamma", "finetune_epochs", "finetune_loss",
    "finetune_lr", "finetune_eps", "finetune_patience", "bilevel_steps", "bilevel_alpha", "ignore", "input_shape", "device", "batch_size",
    "latency_batch", "no_latency", "sparse_storage",
)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@click.option("--eval-data", default=None, type=click.Path(dir_okay=False),
              help="Data for the before/after evaluation (default: a seeded, group-stratified held-out part of --data).")
@click.option("--methods", default="magnitude,taylor,fairgrape", show_default=True, help="Methods to try, comma-separated.")
@click.option("--sparsities", default="0.3,0.5,0.7", show_default=True,
              help="Fractions removed to try, comma-separated, each in (0, 1).")
@click.option("--structured/--unstructured", default=True, show_default=True,
              help="Remove whole channels (smaller and faster) or zero single weights.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma-separated. Without --eval-data every run is judged on the same held-out part of --data, "
                   "split with the first seed.")
@click.option("--jobs", type=click.IntRange(1), default=None, help="Runs in parallel, one core each (default: number of cores).")
@click.option("--disparity", default="std_delta", show_default=True, type=click.Choice(DISPARITIES),
              help="Disparity axis of the Pareto front (minimised).")
@click.option("--max-disparity", type=float, default=None,
              help="Recommend the most accurate front run whose disparity is at most this (a fraction, e.g. 0.01).")
@click.option("--max-macs-ratio", type=float, default=None, help="Recommend only among runs keeping at most this fraction of MACs.")
@click.option("--disparity-weight", type=float, default=1.0, show_default=True,
              help="Without --max-disparity: recommend the front run maximising accuracy - weight x disparity "
                   "(a finite number >= 0).")
@click.option("--keep-models", is_flag=True, help="Keep every pruned model as DIR/models/<run-id>.onnx.")
@click.option("--force", is_flag=True, help="Redo every run, even those whose report is already in DIR/runs.")
@click.option("--no-plots", is_flag=True, help="Skip the PNGs (the HTML report then has tables only).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder (created; reused to resume).")
@click.option("--json", "json_out", default=None, help="Write results.json's document to PATH as well, or - for stdout.")
def sweep(model: str, data: str | None, eval_data: str | None, methods: str, sparsities: str, structured: bool, seeds: str,
          jobs: int | None, disparity: str, max_disparity: float | None, max_macs_ratio: float | None,
          disparity_weight: float, keep_models: bool, force: bool, no_plots: bool, out: str, json_out: str | None,
          input_shape: tuple[str, ...], ignore: tuple[str, ...], no_latency: bool, **kw) -> None:
    """Prune MODEL with every method x sparsity x seed, and choose the accuracy/fairness trade-off.

    Writes DIR/runs/<run-id>.json (one prune report per run; a rerun skips finished runs), DIR/results.csv and
    DIR/results.json (one row per run, Pareto front and recommendation), DIR/pareto.png, DIR/groups.png and a
    self-contained DIR/report.html. A plot this sweep does not draw (--no-plots; groups.png without a
    recommended run) is removed from DIR, so DIR describes the latest sweep only.
    """
    if not out.strip():  # Path("") is the working folder: the sweep would fill it
        raise UsageError("--out is empty; give a folder path")
    if json_out is not None and not json_out.strip():  # before it is compared with --out
        raise UsageError("--json is empty; give a file path")
    json_out = _json_beside_results(json_out, out)
    check_outputs({"model": model, "--data": data, "--eval-data": eval_data}, {"--json": json_out})
    data_kw = {k: kw.pop(k) for k in ("groups", "label", "features", "image_size", "mean", "std", "layout")}
    if not data or not data_kw["groups"]:
        raise UsageError("onnxfair sweep measures accuracy and disparity: pass --data and --groups (e.g. --groups race)")
    check_recommendation_options(max_disparity, max_macs_ratio, disparity_weight)
    method_list = parse_list(methods, str, "--methods")
    sparsity_list = parse_list(sparsities, float, "--sparsities")
    seed_list = parse_list(seeds, int, "--seeds")
    for seed in seed_list:
        check_seed(seed, "--seeds")
    base = PruneConfig(method=method_list[0], structured=structured, sparsity=sparsity_list[0], seed=seed_list[0],
                       input_shapes=parse_input_shapes(input_shape), ignore=tuple(ignore), latency=not no_latency, **kw)
    spec = DataSpec(data, eval_data, [g.strip() for g in data_kw["groups"].split(",") if g.strip()], data_kw["label"],
                    [c.strip() for c in data_kw["features"].split(",")] if data_kw["features"] else None,
                    image_options(data_kw))
    plan = SweepPlan(model, spec, Path(out), method_list, sparsity_list, seed_list, base,
                     jobs=jobs or os.cpu_count() or 1, keep_models=keep_models, force=force)
    runs = expand(plan)  # bad methods, sparsities or combinations fail here, before anything is loaded or run
    check_out(plan, runs)  # so does an --out the sweep could not fill
    inputs = {"model": model, "--data": data, "--eval-data": eval_data}
    for f in output_files(plan, runs):  # no file the sweep writes may be one of its inputs, before the first run
        for name, source in inputs.items():
            if source and f.exists() and os.path.samefile(f, source):
                raise UsageError(f"the input {name} {source} is a file this sweep writes ({f}); move it out of --out or "
                                 "choose another --out")
    if not no_plots:
        from onnxfair.plots import require_matplotlib

        require_matplotlib()
    m = load_model(model)
    calib, eval_ds = load_data([data, eval_data], m, data_kw, base.input_shapes)

    terminated = []

    def on_sigterm(signum, frame):  # what timeout, CI runners and orchestrators send: stop as Ctrl-C does
        terminated.append(signum)
        raise KeyboardInterrupt

    with out_lock(out):  # one sweep at a time in --out, from the first run to the last file written
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            result = run_sweep(plan, m, calib, eval_ds, progress, disparity, max_disparity, max_macs_ratio,
                               disparity_weight)
        except KeyboardInterrupt:
            progress(f"{'terminated' if terminated else 'interrupted'}; finished runs are kept in {Path(out) / 'runs'}: "
                     "run the same command again to resume")
            sys.exit(143 if terminated else 130)
        finally:
            signal.signal(signal.SIGTERM, previous)
        with _signals_deferred() as caught:  # the results, plots and report are written as one set, or the runs kept
            summary = _write_outputs(plan, result, model, out, structured, no_plots, disparity, max_disparity,
                                     max_macs_ratio, disparity_weight)
    if caught:
        progress(f"{'terminated' if signal.SIGTERM in caught else 'interrupted'} while writing the results; they were "
                 f"written in full first, in {out}")
        sys.exit(143 if signal.SIGTERM in caught else 130)
    if json_out != "-":
        click.echo(format_rows(summary["rows"], disparity))
        click.echo("")
        rec = summary["recommendation"]
        click.echo(f"recommended: {rec['run_id']} ({rec['why']})" if rec["run_id"] else f"no recommendation: {rec['why']}")
    emit_json(summary, json_out)
    if summary["recommendation"]["run_id"] is None and (max_disparity is not None or max_macs_ratio is not None):
        # a pipeline gating on the constraints must see them unmet without parsing the results
        progress(f"no run meets the constraints: {summary['recommendation']['why']} (exit {UNMET_EXIT})")
        sys.exit(UNMET_EXIT)


@contextlib.contextmanager
def _signals_deferred():
    """Hold Ctrl-C and SIGTERM while the outputs are written, so the folder never mixes this sweep's results
    with an earlier sweep's report and plots; yields the signals caught, for the caller to act on after."""
    caught: list[int] = []

    def hold(signum, frame):
        caught.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_outputs(plan, result, model: str, out: str, structured: bool, no_plots: bool, disparity: str,
                   max_disparity, max_macs_ratio, disparity_weight) -> dict:
    """results.csv/json, the plots and report.html; returns the summary they show."""
    summary = sweep_summary(plan, result, disparity, max_disparity, max_macs_ratio, disparity_weight)
    csv_path, json_path = write_results(out, summary)
    images: dict[str, bytes] = {}
    if not no_plots:
        from onnxfair.plots import groups_png, pareto_png

        kind = "structured" if structured else "unstructured"
        p = pareto_png(summary["rows"], disparity, Path(out) / "pareto.png",
                       title=f"{Path(model).name}: {len(summary['rows'])} runs ({kind})")
        images["pareto"] = p.read_bytes()
        if result.recommended:
            g = groups_png(result.reports[result.recommended], Path(out) / "groups.png", name=result.recommended)
            images["groups"] = g.read_bytes()
    for name in PLOTS:  # a plot of an earlier sweep in this folder would describe other runs
        stale = Path(out) / name
        if name[:-len(".png")] not in images and stale.is_file():
            stale.unlink()
            progress(f"removed {stale}: an earlier sweep's plot, which this one does not draw")
    others = foreign_models(plan, result)
    if others:
        progress(f"note: {others[0].parent} also holds {len(others)} model file{'s' * (len(others) > 1)} this sweep "
                 f"did not keep (an earlier sweep's, e.g. {others[0].name}); this sweep's are the run ids of results.json")
    from onnxfair.plots import html_report

    html_path = html_report(summary, Path(out) / "report.html", images)
    pngs = [str(Path(out) / f"{name}.png") for name in images]
    progress("wrote " + ", ".join([str(csv_path), str(json_path), str(html_path), *pngs]))
    return summary


def _json_beside_results(json_out: str | None, out: str) -> str | None:
    """--json DIR/results.json is the document the sweep writes there anyway (DIR may not exist yet): None, so
    it is written once. Any other path inside DIR is refused: it would overwrite, or be overwritten by, the
    sweep's own files."""
    if json_out in (None, "-"):
        return json_out
    target, folder = Path(json_out).resolve(), Path(out).resolve()
    if target == folder / "results.json":
        return None
    if target == folder or target in folder.parents:
        raise UsageError(f"--json {json_out} is the --out folder or a folder above it; give a file path, e.g. --json "
                         f"{Path(out) / 'results.json'} (the document the sweep writes there anyway)")
    if folder in target.parents:
        raise UsageError(f"--json {json_out} is inside --out {out}, where the sweep writes its own files; "
                         f"{Path(out) / 'results.json'} holds the same document, so drop --json or give a path outside it")
    return json_out


sweep.params.extend(copy.copy(p) for p in _prune_command.params if p.name in PASS_THROUGH)

COMMANDS = [sweep]
