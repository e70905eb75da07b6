"""`onnxfair prune`: one method end to end, with a JSON and Markdown report."""

from __future__ import annotations

from pathlib import Path

import click

from cli.options import data_options_optional, emit_json, load_data, load_model, parse_input_shapes, progress
from cli.outputs import check_outputs
from onnxfair.errors import UsageError
from onnxfair.model import save_model_atomic, write_text_atomic
from onnxfair.prune import METHODS, PruneConfig, prune_model
from onnxfair.report import format_prune


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@data_options_optional
@click.option("--eval-data", default=None, type=click.Path(dir_okay=False),
              help="Data for the before/after evaluation (default: a seeded, group-stratified held-out part of --data).")
@click.option("--method", default="fairgrape", show_default=True, type=click.Choice(METHODS), help="Importance criterion / pruning method.")
@click.option("--structured/--unstructured", default=True, show_default=True,
              help="Remove whole channels (smaller and faster) or zero single weights (smaller when stored sparse).")
@click.option("--sparsity", type=float, default=None, help="Fraction of prunable channels (structured) or weights (unstructured) removed.")
@click.option("--target-macs", type=float, default=None, help="Fraction of MACs to keep (structured).")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["layer", "global"]),
              help="One global ranking with per-layer normalisation (protects fragile layers), or the same fraction per layer.")
@click.option("--round-to", default=8, show_default=True, type=int, help="Keep channel counts multiples of this (fast CPU kernels); 1 disables.")
@click.option("--iterations", default=1, show_default=True, type=int, help="Iterative schedule: steps, importance recomputed on the masked model.")
@click.option("--loss", default="ce", show_default=True, type=click.Choice(["ce", "pw"]), help="Scoring loss: cross-entropy or performance-weighted.")
@click.option("--beta", default=0.75, show_default=True, type=float, help="pw loss: weight floor β.")
@click.option("--gamma", default=5.0, show_default=True, type=float, help="pw loss: focusing exponent γ.")
@click.option("--damping", default=0.0, show_default=True, type=float,
              help="fairgrape: add damping x lambda_g x w^2 to each group's importance, lambda_g its mean curvature "
                   "(optimal-brain-damage saliency with a damped Fisher); 0 is the paper's. Try 10 when fairgrape "
                   "loses much more accuracy than magnitude.")
@click.option("--finetune-epochs", default=0, show_default=True, type=int, help="Weight update after pruning (0: none).")
@click.option("--step-epochs", default=0, show_default=True, type=int,
              help="With --iterations: fine-tune this many epochs after each step but the last, before rescoring.")
@click.option("--repair", default="none", show_default=True, type=click.Choice(["none", "balanced", "plain"]),
              help="After selection (each step's, with --iterations), rescale each pruned layer's output channels to the dense "
                   "model's mean and std on --data (no gradients; for BatchNorm-folded CNNs). balanced: every group weighs "
                   "the same in those statistics.")
@click.option("--finetune-loss", default="ce", show_default=True, type=click.Choice(["ce", "pw", "balanced", "distill", "equalized", "ceag"]),
              help="ce; pw (performance-weighted, soft targets); balanced (every group's mean loss weighs the same; "
                   "keeps the epoch with the best mean group accuracy); distill (match the dense model's outputs, "
                   "every group weighing the same; early stopping as balanced); equalized (equal group losses) or ceag "
                   "(excess accuracy gap <= --eps), both by dual ascent.")
@click.option("--finetune-lr", default=1e-3, show_default=True, type=float, help="Fine-tuning learning rate (Adam).")
@click.option("--eps", "finetune_eps", default=0.02, show_default=True, type=float, help="ceag: tolerated excess accuracy gap ε.")
@click.option("--patience", "finetune_patience", default=3, show_default=True, type=int,
              help="Fine-tuning stops after this many epochs without a new best on its held-out part (0: runs every "
                   "epoch); the best epoch is kept either way.")
@click.option("--bilevel-steps", default=200, show_default=True, type=click.IntRange(1),
              help="bilevel: joint mask/weight training steps.")
@click.option("--bilevel-alpha", default=1.0, show_default=True, type=float,
              help="bilevel: weight of the fairness penalty (spread of group losses).")
@click.option("--ignore", multiple=True, help="Glob of node or initializer names never to prune (repeatable).")
@click.option("--input-shape", "input_shape", multiple=True, help="Fix symbolic dims: NAME=d0,d1,... (repeatable).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds all randomness (held-out split, batch order, the methods' draws): same inputs and seed, same masks.")
@click.option("--split-seed", type=int, default=None,
              help="Seed of the held-out part of --data judged without --eval-data (default: --seed); a sweep's runs all "
                   "use its first seed, so this replays one of them.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="torch device for scoring and fine-tuning, onnxruntime provider for evaluation (auto: cuda if present).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="torch and onnxruntime intra-op threads, and layers ranked at once (0: all cores); 1 is fastest for small models on busy machines.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Batch size for scoring, repair and fine-tuning.")
@click.option("--latency-batch", default=1, show_default=True, type=click.IntRange(1), help="Batch size for latency timing.")
@click.option("--no-latency", is_flag=True, help="Skip latency timing.")
@click.option("--sparse-storage", is_flag=True, help="Unstructured: store pruned weights as sparse initializers where smaller.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the pruned model.")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False), help="Write the JSON report here (and a .md summary beside it).")
@click.option("--json", "json_out", default=None, help="Write the JSON report to PATH, or - for stdout.")
def prune(model: str, data: str | None, eval_data: str | None, output: str, report_path: str | None, json_out: str | None,
          input_shape: tuple[str, ...], ignore: tuple[str, ...], no_latency: bool, **kw) -> None:
    """Prune MODEL under a budget with a fairness-aware method, and report before/after per group."""
    check_outputs({"model": model, "--data": data, "--eval-data": eval_data},
                  {"-o": output, "--report": report_path, "--json": json_out})
    data_kw = {k: kw.pop(k) for k in ("groups", "label", "features", "image_size", "mean", "std", "layout")}
    if data and not data_kw["groups"]:
        raise UsageError("--data needs --groups naming the group attribute(s), e.g. --groups race")
    if eval_data and not data:
        raise UsageError("--eval-data needs --data and --groups as well")
    if kw["split_seed"] is not None and (eval_data or not data):
        raise UsageError("--split-seed seeds the held-out part of --data, which is judged only without --eval-data; "
                         "drop --split-seed")
    cfg = PruneConfig(input_shapes=parse_input_shapes(input_shape), ignore=tuple(ignore), latency=not no_latency, **kw)
    cfg.validate(has_data=bool(data))  # settings first: a bad option should not wait for the model and data
    m = load_model(model)
    calib, eval_ds = load_data([data, eval_data], m, data_kw, cfg.input_shapes) if data else (None, None)
    progress(f"pruning {model}: {cfg.method}, {'structured' if cfg.structured else 'unstructured'}")
    result = prune_model(m, calib, eval_ds, cfg, progress=progress)
    result.report["input"] = {"model": model, "data": data, "eval_data": eval_data, "output": output}
    save_model_atomic(result.model, output, protect=[model])
    progress(f"wrote {output}")
    if report_path:
        emit_json(result.report, report_path)
        write_text_atomic(result.markdown, Path(report_path).with_suffix(".md"))
    if json_out != "-":
        click.echo(format_prune(result.report))
    emit_json(result.report, json_out)


COMMANDS = [prune]
