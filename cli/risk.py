"""`onnxfair risk`: which groups a magnitude pruning mask is likely to hurt, before pruning."""

from __future__ import annotations

import click

from cli.options import data_options, emit_json, load_data, load_model, parse_input_shapes, progress
from cli.outputs import check_outputs
from onnxfair.risk import RiskConfig, format_risk, risk_report


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@data_options
@click.option("--sparsity", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction removed by the magnitude mask whose risk is assessed.")
@click.option("--structured/--unstructured", default=True, show_default=True,
              help="Channel masks (structured) or per-weight masks over Conv/Gemm/MatMul weights.")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["layer", "global"]),
              help="Magnitude ranking per layer/group or across the model.")
@click.option("--round-to", default=8, show_default=True, type=click.IntRange(1),
              help="Structured: kept channel counts are multiples of this.")
@click.option("--params", "param_set", default="weights", show_default=True, type=click.Choice(["weights", "all"]),
              help="Parameters of the gradient norm and Hessian trace: Conv/Gemm/MatMul weights, or every float initializer.")
@click.option("--hutchinson-samples", default=8, show_default=True, type=click.IntRange(0),
              help="Rademacher vectors for the Hessian-trace estimate (one Hessian-vector product each, per batch; 0 skips it).")
@click.option("--loss", default="ce", show_default=True, type=click.Choice(["ce", "pw"]), help="Loss whose change is predicted.")
@click.option("--beta", default=0.75, show_default=True, type=click.FloatRange(0.0, 1.0), help="pw loss: base sample weight.")
@click.option("--gamma", default=5.0, show_default=True, type=click.FloatRange(0.0), help="pw loss: focusing exponent.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the Rademacher vectors.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="torch device for the gradient and Hessian computations.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(1), help="Rows per forward/backward pass.")
@click.option("--input-shape", "input_shape", multiple=True, help="Fix symbolic dims: NAME=d0,d1,... (repeatable).")
@click.option("--json", "json_out", default=None, help="Write the JSON report to PATH, or - for stdout.")
def risk(model: str, data: str, sparsity: float, structured: bool, scope: str, round_to: int, param_set: str,
         hutchinson_samples: int, loss: str, beta: float, gamma: float, seed: int, device: str, batch_size: int, input_shape: tuple[str, ...],
         json_out: str | None, **kw) -> None:
    """Bias-risk pre-check of MODEL on --data: per-group loss, gradient norm, Hessian trace, uncertain share,
    and the predicted (g'd + d'Hd/2) and measured loss change of the magnitude mask at --sparsity."""
    check_outputs({"model": model, "--data": data}, {"--json": json_out})
    cfg = RiskConfig(sparsity=sparsity, structured=structured, scope=scope, round_to=round_to, params=param_set,
                     hutchinson_samples=hutchinson_samples, seed=seed, loss=loss, beta=beta, gamma=gamma, batch_size=batch_size, device=device)
    cfg.check()  # settings first: a bad option should not wait for the model and data
    m = load_model(model)
    shapes = parse_input_shapes(input_shape)
    ds, = load_data([data], m, kw, shapes)
    progress(f"risk pre-check of {model} on {len(ds)} rows, {len(ds.group_labels)} groups")
    report = risk_report(m, ds, cfg, input_shapes=shapes, progress=progress)
    report = {"model": model, "data": data, "groups_by": ds.attributes, **report}
    if json_out != "-":
        click.echo(format_risk(report))
    emit_json(report, json_out)


COMMANDS = [risk]
