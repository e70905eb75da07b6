"""Evaluating one or several models on a grouped dataset with onnxruntime: metrics plus latency."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import numpy as np
import onnx

from onnxfair.data import GroupedDataset, check_labels
from onnxfair.errors import DataError, ModelError
from onnxfair.head import output_activation, scored_output, several_outputs_note
from onnxfair.metrics import CONVENTIONS, evaluation_block, predictions
from onnxfair.model import classes_of
from onnxfair.runtime import create_session, latency_inputs, measure_latency, timing_batch, warn_once


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
    names: list[str] | None = None,
    correct: list[np.ndarray] | None = None,
) -> list[dict]:
    """Evaluation blocks for several models on the same rows; latency repetitions interleaved across them.

    `phase` (a timer opening a named phase) lets a caller book the latency repetitions as their own phase;
    `names` name the models in messages (default: "the model", or "model 1", "model 2", ...); `correct`,
    when given, receives each model's per-row correctness (for the uncertainty of the degradation)."""
    names = names or (["the model"] if len(models) == 1 else [f"model {i + 1}" for i in range(len(models))])
    for i, (m, name) in enumerate(zip(models, names)):
        note = several_outputs_note(m, name)
        if note and scored_output(m) not in [scored_output(prev) for prev in models[:i]]:  # once for a model's rewrite
            warn_once(note)
    sessions = [create_session(m, device, input_shapes, threads) for m in models]
    blocks = []
    for m, s, name in zip(models, sessions, names):
        out = s.run(ds.inputs, batch_size)
        if out.shape[0] != len(ds):
            raise DataError(f"the model returned {out.shape[0]} rows for {len(ds)} inputs; is the batch axis first?")
        check_scores(out, name)
        if out.dtype.kind == "f" and sum(d > 1 for d in out.shape[1:]) > 1:
            warn_once(f"{name}'s first output has shape {list(out.shape[1:])} per row, scored as {classes_of(out.shape)} "
                      "classes (the argmax over all of them): a head with scores per position (tokens, pixels) is not "
                      "a classifier onnxfair can judge; re-export it with one row of class scores per input row")
        check_labels(ds.y, classes_of(out.shape) if out.dtype.kind == "f" else None)
        activation = output_activation(m)
        block = evaluation_block(out, ds.y, ds.group_ids, ds.group_labels, activation is not None)
        if correct is not None:
            correct.append(predictions(out, activation is not None) == ds.y)
        block["output"] = {**(scored_output(m) or {}), "read_as": _read_as(out, activation),
                           "classes": classes_of(out.shape) if out.dtype.kind == "f" else None}
        block["conventions"] = CONVENTIONS
        blocks.append(block)
    if latency:
        with phase("latency") if phase is not None else contextlib.nullcontext():
            feed = latency_inputs(ds.inputs, timing_batch(sessions, latency_batch))
            for block, lat in zip(blocks, measure_latency(sessions, feed, repeats=repeats)):
                block["latency"] = lat
    return blocks


def check_scores(out: np.ndarray, name: str = "the model") -> None:
    """Refuse outputs no class can be read from faithfully: NaN or infinite scores (argmax or a threshold would
    still pick one, silently), and integers in several columns per row (TopK indices, say: argmax over them
    would pick a position, not a class)."""
    if out.dtype.kind in "biu" and out.ndim > 1 and int(np.prod(out.shape[1:])) > 1:
        raise ModelError(f"{name}'s first output holds {out.dtype} values in {int(np.prod(out.shape[1:]))} columns per "
                         "row; onnxfair reads an integer output as one class index per row: re-export the model with "
                         "its class scores (logits or probabilities) or one class index per row as the first output")
    if out.dtype.kind != "f":
        return
    bad = int((~np.isfinite(out.reshape(out.shape[0], -1))).any(axis=1).sum())
    if bad:
        raise ModelError(f"{name} outputs NaN or infinite values in {bad:,} of {out.shape[0]:,} rows; fix the graph "
                         "(a Log or Div of a value that reaches 0, say) or drop the rows that produce them")


def _read_as(out: np.ndarray, activation: str | None) -> str:
    """How the scored output is read, for the report."""
    if out.dtype.kind in "biu" and (out.ndim == 1 or int(np.prod(out.shape[1:])) == 1):
        return "class indices"
    return "logits" if activation is None else f"{activation} probabilities"
