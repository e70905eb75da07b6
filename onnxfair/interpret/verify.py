"""Check the interpreter against onnxruntime on seeded random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from onnxfair.errors import ModelError, UsageError
from onnxfair.interpret.module import INTERPRETER_ERRORS, one_line
from onnxfair.model import input_dims, input_specs


def random_inputs(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0, batch: int = 2
) -> dict[str, np.ndarray]:
    """Seeded inputs of the model's dtypes; a symbolic leading dim becomes `batch`, others need a shape."""
    rng = np.random.default_rng(seed)
    input_shapes = dict(input_shapes or {})
    # a batch given for one input is the batch of all (lengths beside token ids must have as many rows)
    specs = input_specs(model)
    batch_dim = specs[0].shape[0] if specs and specs[0].shape else None
    batch = next((int(input_shapes[s.name][0]) for s in specs if s.name in input_shapes and s.shape
                  and isinstance(batch_dim, str) and s.shape[0] == batch_dim), batch)
    dims = input_dims(model, input_shapes, batch=batch, require_static=True)
    feeds: dict[str, np.ndarray] = {}
    for s in specs:
        given = input_shapes.get(s.name)
        # verify runs the model as it is, so unlike a session it cannot take another fixed batch
        if given is not None and s.shape and isinstance(s.shape[0], int) and s.shape[0] != given[0]:
            raise UsageError(f"--input-shape {s.name}: dim 0 is fixed to {s.shape[0]} in the model, not {given[0]}")
        shape = dims[s.name] if given is None else tuple(int(d) for d in given)
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            arr = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            arr = rng.random(shape) < 0.5
        elif dt.kind in "iu":
            arr = rng.integers(0, 4, size=shape).astype(dt)
        else:
            raise UsageError(f"input {s.name!r} has dtype {dt}, which onnxfair cannot generate")
        feeds[s.name] = arr
    return feeds


def verify(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0) -> dict[str, float]:
    """Largest absolute and relative (to the largest reference magnitude) output difference vs onnxruntime."""
    from onnxfair.interpret.module import OnnxModule
    from onnxfair.runtime import create_session, ort_message

    feeds = random_inputs(model, input_shapes, seed)
    mod = OnnxModule(model).eval()
    sess = create_session(model, "cpu", dynamic_batch=False).session  # quiet: failures come back as one line
    try:
        refs = sess.run(None, feeds)
    except Exception as exc:
        raise ModelError(f"--verify: onnxruntime fails on seeded random inputs ({ort_message(exc)}); fix the model so "
                         "that onnxruntime runs it, or inspect without --verify") from None
    try:
        with torch.no_grad():
            out = mod(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    except INTERPRETER_ERRORS as exc:
        raise ModelError(f"--verify: the interpreter fails where onnxruntime runs ({one_line(exc)}); inspect without "
                         "--verify, and report the model") from None
    outs = out if isinstance(out, tuple) else (out,)
    max_abs, scale = 0.0, 0.0
    for got, ref in zip(outs, refs):
        g = got.detach().cpu()
        g = (g.float() if g.dtype == torch.bfloat16 else g).numpy().astype(np.float64)
        r = np.asarray(ref).astype(np.float64)
        if g.shape != r.shape:
            return {"max_abs_diff": float("inf"), "max_rel_diff": float("inf")}
        if r.size:
            both_inf = np.isinf(r) & (g == r)
            d = np.where(both_inf | (np.isnan(r) & np.isnan(g)), 0.0, np.abs(g - r))
            max_abs = max(max_abs, float(np.nanmax(np.where(np.isnan(d), np.inf, d))))
            finite = np.abs(r[np.isfinite(r)])
            if finite.size:
                scale = max(scale, float(finite.max()))
    rel = max_abs / scale if scale > 0 else max_abs
    return {"max_abs_diff": max_abs, "max_rel_diff": rel}
