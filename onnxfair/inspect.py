"""What a user needs to know about a model before pruning it: I/O, ops, size, interpretability, groups."""

from __future__ import annotations

from collections import Counter

import onnx

from onnxfair.model import batch_axis_error, fix_input_shapes, input_specs


def _io(values) -> list[dict]:
    out = []
    for vi in values:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append({"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None, "shape": dims})
    return out


def inspect_model(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    verify: bool = False,
    groups: bool = False,
    ignore: tuple[str, ...] = (),
    seed: int = 0,
) -> dict:
    """The `inspect` report; `verify` runs the interpreter against onnxruntime on seeded random inputs."""
    from onnxfair.errors import OnnxfairError, UnsupportedError, UsageError
    from onnxfair.graph import model_cost
    from onnxfair.interpret import unsupported_ops
    from onnxfair.interpret.compile import refusal_message

    inits = {i.name for i in model.graph.initializer}
    ops = Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)
    unsupported = unsupported_ops(model)
    report: dict = {
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [s for s in _io(fix_input_shapes(model, input_shapes or {}).graph.input) if s["name"] not in inits],
        "outputs": _io(model.graph.output),
        "nodes": len(model.graph.node),
        "op_counts": dict(sorted(ops.items())),
        "unsupported_ops": [f"{op} x{n}" for op, n in sorted(unsupported.items())],
        # every key below is always there (null or false when not computed), so a pipeline reads one shape
        "parameters": None, "macs": None, "macs_batch": None, "macs_uncounted": None, "bytes": model.ByteSize(),
        "cost_error": None, "needs_input_shape": False, "batch_not_first": False,
        "verify": None, "channel_analysis": None,
        "batch_inputs": [s.name for s in input_specs(model)],
    }
    misplaced = batch_axis_error(model)
    if misplaced:  # counted per row of axis 0, MACs would be per time step: describe, then refuse
        report.update(cost_error=misplaced, batch_not_first=True)
        return report
    try:
        cost = model_cost(model, input_shapes)
        report.update(parameters=cost.params, macs=cost.macs, macs_batch=cost.batch, bytes=cost.bytes,
                      macs_uncounted=cost.unknown)
    except UnsupportedError as exc:
        report.update(cost_error=str(exc))
    except UsageError as exc:  # a dim only --input-shape can size: what needs no sizes is still described
        report.update(cost_error=str(exc), needs_input_shape=True)
        return report  # --verify and --groups need the same sizes
    if verify:
        # what stops the comparison is reported with the rest (the caller exits 2 after showing it)
        if unsupported:
            report["verify"] = {"error": "--verify: " + refusal_message(unsupported)}
        else:
            from onnxfair.interpret import verify as run_verify

            try:
                report["verify"] = run_verify(model, input_shapes=input_shapes, seed=seed)
            except OnnxfairError as exc:
                report["verify"] = {"error": str(exc) if str(exc).startswith("--verify") else f"--verify: {exc}"}
    if groups:
        from onnxfair.graph import analyze

        report["channel_analysis"] = analyze(model, input_shapes=input_shapes, ignore=ignore).to_dict()
    return report
