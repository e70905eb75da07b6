"""`onnxfair evaluate` and `onnxfair compare`."""

from __future__ import annotations

import click

from cli.options import data_options, emit_json, load_data, load_model, parse_input_shapes, progress, runtime_options
from cli.outputs import check_outputs
from onnxfair.errors import UsageError
from onnxfair.evaluate import evaluate_models
from onnxfair.head import scored_output
from onnxfair.metrics import degradation, std_delta_uncertainty
from onnxfair.model import class_count, input_specs
from onnxfair.prune import latency_summary
from onnxfair.report import format_comparison, format_evaluation


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@runtime_options
@click.option("--no-latency", is_flag=True, help="Skip latency timing.")
@click.option("--json", "json_out", default=None, help="Write the JSON report to PATH, or - for stdout.")
def evaluate(model: str, data: str, json_out: str | None, no_latency: bool, device: str, batch_size: int,
             latency_batch: int, input_shape: tuple[str, ...], **kw) -> None:
    """Per-group accuracy and disparity of MODEL on --data, with onnxruntime."""
    _latency_batch_read(no_latency, latency_batch)
    check_outputs({"model": model, "--data": data}, {"--json": json_out})
    m = load_model(model)
    shapes = parse_input_shapes(input_shape)
    ds, = load_data([data], m, kw, shapes)
    progress(f"evaluating {model} on {len(ds)} rows, {len(ds.group_labels)} groups")
    block = evaluate_models([m], ds, device=device, batch_size=batch_size, latency=not no_latency,
                            latency_batch=latency_batch, input_shapes=shapes, names=[model])[0]
    report = {"onnxfair_evaluation": 1, "model": model, "data": data, "groups_by": ds.attributes,
              "latency": None, **block}  # null with --no-latency: the document keeps one shape
    if json_out != "-":
        click.echo(format_evaluation(block))
    emit_json(report, json_out)


@click.command()
@click.argument("model_a", type=click.Path(dir_okay=False))
@click.argument("model_b", type=click.Path(dir_okay=False))
@data_options
@runtime_options
@click.option("--no-latency", is_flag=True, help="Skip latency timing.")
@click.option("--json", "json_out", default=None, help="Write the JSON report to PATH, or - for stdout.")
def compare(model_a: str, model_b: str, data: str, json_out: str | None, no_latency: bool, device: str,
            batch_size: int, latency_batch: int, input_shape: tuple[str, ...], **kw) -> None:
    """MODEL_A (dense) and MODEL_B (pruned) side by side, with the degradation of B relative to A."""
    _latency_batch_read(no_latency, latency_batch)
    check_outputs({"MODEL_A": model_a, "MODEL_B": model_b, "--data": data}, {"--json": json_out})
    a, b = load_model(model_a), load_model(model_b)
    _same_inputs(a, b)
    _same_classes(*({**(scored_output(m) or {}), "classes": class_count(m)} for m in (a, b)))
    shapes = parse_input_shapes(input_shape)
    ds, = load_data([data], a, kw, shapes)
    progress(f"comparing {model_a} and {model_b} on {len(ds)} rows")
    correct: list = []
    ea, eb = evaluate_models([a, b], ds, device=device, batch_size=batch_size, latency=not no_latency,
                             latency_batch=latency_batch, input_shapes=shapes, names=[model_a, model_b], correct=correct)
    _same_classes(ea["output"], eb["output"])  # the outputs themselves, where the declared shapes did not tell
    deg = {**degradation(ea, eb), **std_delta_uncertainty(*correct, ds.group_ids)}
    if json_out != "-":
        click.echo(format_comparison(ea, eb, deg, "A", "B"))
    speedup = latency_summary(ea["latency"], eb["latency"])["speedup"] if ea.get("latency") and eb.get("latency") else None
    emit_json({"onnxfair_comparison": 1, "data": data, "groups_by": ds.attributes,
               "a": {"model": model_a, "latency": None, **ea}, "b": {"model": model_b, "latency": None, **eb},
               "degradation": deg, "speedup": speedup}, json_out)


def _latency_batch_read(no_latency: bool, latency_batch: int) -> None:
    """An option moved from its default that the run would not read is refused, as `prune` refuses it."""
    if no_latency and latency_batch != 1:
        raise UsageError(f"--latency-batch {latency_batch} has no effect with --no-latency, which skips latency "
                         "timing; drop --latency-batch")


def _same_classes(oa: dict, ob: dict) -> None:
    """Per-group deltas between models that score different class sets mean nothing (unknown counts pass)."""
    ca, cb = oa.get("classes"), ob.get("classes")
    if ca is not None and cb is not None and ca != cb:
        raise UsageError(f"MODEL_A's scored (first) output {oa.get('name')!r} has {ca} classes, MODEL_B's "
                         f"{ob.get('name')!r} {cb}; compare a model with its own pruned version, or re-export so that "
                         "both put the same class scores first")


def _same_inputs(a, b) -> None:
    """The data is read for MODEL_A; MODEL_B must take the same inputs (fixed dims equal, symbolic ones free)."""
    def fits(x, y) -> bool:
        return len(x.shape) == len(y.shape) and all(
            not isinstance(i, int) or not isinstance(j, int) or i == j for i, j in zip(x.shape, y.shape))

    sa, sb = input_specs(a), {s.name: s for s in input_specs(b)}
    for spec in sa:
        other = sb.get(spec.name)
        if other is None or other.dtype != spec.dtype or not fits(spec, other):
            found = "no such input" if other is None else f"{other.dtype} {list(other.shape)}"
            raise UsageError(f"MODEL_B does not take MODEL_A's input {spec.name!r} ({spec.dtype} {list(spec.shape)}; "
                             f"B has {found}); compare a model with its own pruned version")
    if len(sb) != len(sa):
        raise UsageError(f"MODEL_B has {len(sb)} inputs, MODEL_A {len(sa)}; compare a model with its own pruned version")


COMMANDS = [evaluate, compare]
