"""`onnxfair inspect`: inputs, ops, size, interpretability (--verify) and prunable channel groups (--groups)."""

from __future__ import annotations

import click

from cli.options import emit_json, load_model, parse_input_shapes, progress
from cli.outputs import check_outputs
from onnxfair.errors import UnsupportedError, UsageError
from onnxfair.graph.cost import uncounted_note
from onnxfair.inspect import inspect_model
from onnxfair.prune import unmatched_patterns, unmatched_warning
from onnxfair.settings import check_seed


def _format(rep: dict) -> str:
    lines = []
    for kind in ("inputs", "outputs"):
        for io in rep[kind]:
            lines.append(f"{kind[:-1]:<7}{io['name']:<24}{io['dtype'] or '?':<10}{io['shape']}")
    lines.append(f"nodes {rep['nodes']}: " + ", ".join(f"{op} {n}" for op, n in rep["op_counts"].items()))
    if rep.get("macs") is not None:
        lines.append(f"parameters {rep['parameters']:,}   MACs {rep['macs']:,} (batch {rep.get('macs_batch', 1)})   bytes {rep['bytes']:,}")
        note = uncounted_note(rep.get("macs_uncounted", []))
        if note:
            lines.append(f"note: {note}")
    lines.append("unsupported ops: " + (", ".join(rep["unsupported_ops"]) or "none"))
    if rep["verify"] is not None and "error" not in rep["verify"]:
        v = rep["verify"]
        lines.append(f"verify vs onnxruntime: max abs diff {v['max_abs_diff']:.3g}, max rel diff {v['max_rel_diff']:.3g}")
    ca = rep.get("channel_analysis")
    if ca:
        lines.append("")
        lines.append(f"{len(ca['groups'])} prunable channel groups:")
        lines.append(f"  {'id':>3}  {'name':<40}{'channels':>9}{'MACs %':>9}{'params %':>10}  members")
        for g in ca["groups"]:
            lines.append(
                f"  {g['id']:>3}  {g['name'][:39]:<40}{g['channels']:>9}{100 * g['macs_share']:>9.2f}"
                f"{100 * g['params_share']:>10.2f}  {len(g['members'])}"
            )
        if ca["frozen"]:
            lines.append(f"{len(ca['frozen'])} frozen channel spaces:")
            for f in ca["frozen"]:
                lines.append(f"  {f['space'][:50]:<52}{f.get('channels', ''):>6}  {f['reason']}")
    return "\n".join(lines)


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--verify", is_flag=True, help="Run the torch interpreter and onnxruntime on seeded random inputs and compare.")
@click.option("--groups", "show_groups", is_flag=True, help="Show the prunable channel groups and why other channels are frozen.")
@click.option("--ignore", multiple=True, help="Glob of node or initializer names never to prune (with --groups).")
@click.option("--input-shape", "input_shape", multiple=True, help="Fix symbolic dims: NAME=d0,d1,... (repeatable).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random inputs of --verify.")
@click.option("--json", "json_out", default=None, help="Write the JSON report to PATH, or - for stdout.")
def inspect(model: str, verify: bool, show_groups: bool, ignore: tuple[str, ...], input_shape: tuple[str, ...],
            seed: int, json_out: str | None) -> None:
    """Describe MODEL: inputs/outputs, op counts, parameters, MACs, unsupported ops."""
    check_outputs({"model": model}, {"--json": json_out})
    if ignore and not show_groups:
        raise UsageError("--ignore changes only the channel groups that --groups shows; add --groups or drop --ignore")
    if seed and not verify:
        raise UsageError("--seed draws the random inputs of --verify; add --verify or drop --seed")
    check_seed(seed, "--seed")
    m = load_model(model)
    for pattern in unmatched_patterns(m, ignore):
        progress(unmatched_warning(pattern))
    rep = inspect_model(m, parse_input_shapes(input_shape) or None, verify=verify, groups=show_groups, ignore=ignore, seed=seed)
    rep = {"model": model, **rep}
    if json_out != "-":
        click.echo(_format(rep))
    emit_json(rep, json_out)
    if rep.get("needs_input_shape") or rep.get("batch_not_first"):  # described; MACs, --verify and --groups are not
        raise UsageError(rep["cost_error"])
    if "error" in (rep["verify"] or {}):  # the description is out; the comparison asked for could not run
        raise UnsupportedError(rep["verify"]["error"])


COMMANDS = [inspect]
