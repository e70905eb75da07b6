"""Evaluating one or several models on a grouped dataset with onnxruntime: metrics plus latency."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import onnx

from onnxfair.data import GroupedDataset, check_labels
from onnxfair.errors import DataError
from onnxfair.head import output_activation
from onnxfair.metrics import CONVENTIONS, evaluation_block
from onnxfair.model import classes_of
from onnxfair.runtime import create_session, latency_inputs, measure_latency, timing_batch


def evaluate_models(
    models: list[onnx.ModelProto],
    ds: GroupedDataset,
    device: str = "auto",
    batch_size: int = 256,
    latency: bool = True,
    latency_batch: int = 1,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    threads: int = 0,
    repeats: int = 30,
    phase: Callable[[str], ContextManager] | None = None,
) -> list[dict]:
    """Evaluation blocks for several models on the same rows; latency repetitions interleaved across them.

    `phase` (a timer opening a named phase) lets a caller book the latency repetitions as their own phase."""
    sessions = [create_session(m, device, input_shapes, threads) for m in models]
    blocks = []
    for m, s in zip(models, sessions):
        out = s.run(ds.inputs, batch_size)
        if out.shape[0] != len(ds):
            raise DataError(f"the model returned {out.shape[0]} rows for {len(ds)} inputs; is the batch axis first?")
        check_labels(ds.y, classes_of(out.shape) if out.dtype.kind == "f" else None)
        block = evaluation_block(out, ds.y, ds.group_ids, ds.group_labels, output_activation(m) is not None)
        block["conventions"] = CONVENTIONS
        blocks.append(block)
    if latency:
        with phase("latency") if phase is not None else contextlib.nullcontext():
            feed = latency_inputs(ds.inputs, timing_batch(sessions, latency_batch))
            for block, lat in zip(blocks, measure_latency(sessions, feed, repeats=repeats)):
                block["latency"] = lat
    return blocks
