"""The per-group gradient engine: one forward pass per calibration batch, one backward per demographic group.

For every batch the interpreter runs ONE forward pass; the per-row loss (``ce`` or ``pw``, see
:mod:`onnxfair.losses`) is split by group, and ``torch.autograd.grad(L_g, params, retain_graph=True)``
gives each present group's gradient, where ``L_g`` is the mean loss over that group's rows of the batch.
Nothing else is differentiated: the module is put in eval mode, only the scored parameters require a
gradient while the engine runs (the previous flags and mode are restored), no optimiser exists and the
weights are never written. Accumulators live on the module's device.

What is accumulated (``w`` the parameter value, ``G_{g,b} = ∂L_{g,b}/∂w`` on batch b, ``n_{g,b}`` the
group's rows in the batch, ``n_g`` its rows over the whole calibration set, ``N`` all rows):

``sq``     [K, *shape]  Σ_b (w · G_{g,b})²                          FairGRAPE's per-group importance
``first``  [K, *shape]  w · Σ_b n_{g,b} G_{g,b} / n_g = w · ∂L_g/∂w   L_g the group's calibration-set mean loss
``plain``  [*shape]     w · Σ_b Σ_g n_{g,b} G_{g,b} / N = w · ∂L/∂w   L the calibration-set mean loss

``plain`` is derived from the per-group gradients (Σ_g n_{g,b}/n_b · G_{g,b} is the gradient of the
batch's mean loss), so the group-blind Taylor term costs no extra backward pass; when no per-group
quantity is needed a single backward of the batch's summed loss is used instead. The signed terms are
accumulated over batches and any absolute value is taken at the end (``|w · ∂L/∂w|`` of the
calibration-set loss, not a sum of per-batch absolute values).

Masked weights: the interpreter multiplies parameters by their masks, so the gradient at a masked
position is exactly zero and every term above is zero there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from onnxfair.errors import DataError, UsageError
from onnxfair.interpret.device import deterministic_cuda
from onnxfair.interpret.module import checked_output
from onnxfair.losses import as_class_logits, loss_fn

__all__ = ["GradStats", "accumulate_gradients", "dense_probabilities", "module_device", "resolve_device"]


@dataclass
class GradStats:
    """What `accumulate_gradients` measured; arrays are float64 numpy, keyed by initializer name."""

    names: list[str]
    group_labels: list[str]
    n_rows: np.ndarray  # [K] calibration rows per group
    group_loss: np.ndarray  # [K] mean loss per group (nan for a group without rows)
    loss: float  # mean loss over all rows
    n_batches: int
    sq: dict[str, np.ndarray] | None = None
    first: dict[str, np.ndarray] | None = None
    plain: dict[str, np.ndarray] | None = None
    seconds: float = 0.0
    backward_passes: int = 0
    info: dict = field(default_factory=dict)


def module_device(mod: Any) -> torch.device:
    """The device of the module's parameters (CPU when it has none)."""
    for p in mod.params.values():
        return p.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, mod: Any) -> torch.device:
    """None keeps the module where it is; "auto" picks CUDA when torch sees it; "cpu"/"cuda" as asked."""
    if device is None:
        dev = module_device(mod)
    elif isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device cuda asked for, but torch sees no CUDA device; use --device cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        deterministic_cuda()
    return dev


def _tensors(inputs: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}


def _logits(mod: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return as_class_logits(checked_output(mod, inputs))


def dense_probabilities(mod: Any, dataset: Any, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities [N, C] (float32) of `mod` as it is now; call it on the unmasked dense model."""
    device = module_device(mod)
    chunks = []
    was_training = mod.training
    mod.eval()
    try:
        with torch.no_grad():
            for inputs, _, _ in dataset.batches(batch_size):
                logits = _logits(mod, _tensors(inputs, device))
                chunks.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    finally:
        mod.train(was_training)
    if not chunks:
        raise DataError("the calibration set is empty")
    return np.concatenate(chunks).astype(np.float32)


def accumulate_gradients(
    mod: Any,
    dataset: Any,
    names: Iterable[str],
    *,
    sq: bool = False,
    first: bool = False,
    plain: bool = False,
    loss: str = "ce",
    dense_probs: np.ndarray | None = None,
    beta: float = 0.75,
    gamma: float = 5.0,
    batch_size: int = 64,
    accumulate_dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> GradStats:
    """Run the calibration set once and return the requested accumulations (see the module docstring)."""
    t0 = time.perf_counter()
    names = list(dict.fromkeys(names))
    all_params = mod.params
    missing = [n for n in names if n not in all_params]
    if missing:
        raise UsageError(f"not float initializers of the model: {', '.join(missing[:5])}")
    if not names:
        raise UsageError("nothing to score: no parameter names given")
    if batch_size < 1:
        raise UsageError("batch size must be at least 1")
    n_total = len(dataset)
    if n_total == 0:
        raise DataError("the calibration set is empty")
    if loss == "pw":
        if dense_probs is None:
            raise UsageError("the pw loss needs the dense model's probabilities (dense_probs)")
        dense_probs = np.asarray(dense_probs)
        if dense_probs.shape[0] != n_total:
            raise DataError(f"dense_probs has {dense_probs.shape[0]} rows, the calibration set {n_total}")
    labels = list(dataset.group_labels) or ["all"]
    K = len(labels)
    per_group = sq or first
    params = [all_params[n] for n in names]
    device = params[0].device
    acc_sq = [torch.zeros((K, *p.shape), dtype=accumulate_dtype, device=device) for p in params] if sq else None
    acc_first = [torch.zeros((K, *p.shape), dtype=accumulate_dtype, device=device) for p in params] if first else None
    acc_plain = [torch.zeros(p.shape, dtype=accumulate_dtype, device=device) for p in params] if (plain and not first) else None

    loss_sum = np.zeros(K, np.float64)
    n_rows = np.zeros(K, np.int64)
    n_batches = 0
    backward = 0
    flags = {n: p.requires_grad for n, p in all_params.items()}
    was_training = mod.training
    offset = 0
    try:
        mod.eval()
        wanted = set(names)
        for n, p in all_params.items():
            p.requires_grad_(n in wanted)
        for inputs, y, gids in dataset.batches(batch_size):
            nb = int(y.shape[0])
            gids = np.asarray(gids, dtype=np.int64) if len(dataset.group_labels) else np.zeros(nb, np.int64)
            x = _tensors(inputs, device)
            yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
            dp = None
            if loss == "pw":
                dp = torch.from_numpy(np.ascontiguousarray(dense_probs[offset:offset + nb])).to(device)
            offset += nb
            per_row = loss_fn(_logits(mod, x), yt, dense_probs=dp, kind=loss, beta=beta, gamma=gamma, reduction="none")
            detached = per_row.detach().double().cpu().numpy()
            counts = np.bincount(gids, minlength=K)
            loss_sum += np.bincount(gids, weights=detached, minlength=K)
            n_rows += counts
            n_batches += 1
            if per_group:
                present = np.flatnonzero(counts)
                gt = torch.from_numpy(gids).to(device)
                for i, g in enumerate(present):
                    loss_g = per_row[gt == int(g)].mean()
                    grads = torch.autograd.grad(loss_g, params, retain_graph=i < len(present) - 1, allow_unused=True)
                    backward += 1
                    ng = float(counts[g])
                    for j, gr in enumerate(grads):
                        if gr is None:
                            continue
                        gr = gr.detach().to(accumulate_dtype)
                        if acc_sq is not None:
                            acc_sq[j][g].addcmul_(gr, gr)
                        if acc_first is not None:
                            acc_first[j][g].add_(gr, alpha=ng)
                        if acc_plain is not None:
                            acc_plain[j].add_(gr, alpha=ng)
            elif acc_plain is not None:
                grads = torch.autograd.grad(per_row.sum(), params, allow_unused=True)
                backward += 1
                for j, gr in enumerate(grads):
                    if gr is not None:
                        acc_plain[j].add_(gr.detach().to(accumulate_dtype))
            if progress is not None:
                progress(f"scored {offset}/{n_total} rows")
    finally:
        for n, p in all_params.items():
            p.requires_grad_(flags[n])
        mod.train(was_training)

    with torch.no_grad():
        values = [p.detach().to(accumulate_dtype) for p in params]
        out_sq = out_first = out_plain = None
        if acc_sq is not None:
            out_sq = {n: (a * (w * w)).double().cpu().numpy() for n, a, w in zip(names, acc_sq, values)}
        if acc_first is not None:
            denom = torch.as_tensor(np.maximum(n_rows, 1), dtype=accumulate_dtype, device=device)
            firsts = []
            for a, w in zip(acc_first, values):
                g_mean = a / denom.reshape((K,) + (1,) * w.ndim)
                firsts.append(g_mean * w)
            out_first = {n: f.double().cpu().numpy() for n, f in zip(names, firsts)}
            if plain:
                share = torch.as_tensor(n_rows / n_total, dtype=accumulate_dtype, device=device)
                out_plain = {n: (f * share.reshape((K,) + (1,) * (f.ndim - 1))).sum(0).double().cpu().numpy()
                             for n, f in zip(names, firsts)}
        elif acc_plain is not None:
            out_plain = {n: (a * w / n_total).double().cpu().numpy() for n, a, w in zip(names, acc_plain, values)}
    with np.errstate(invalid="ignore", divide="ignore"):
        group_loss = np.where(n_rows > 0, loss_sum / np.maximum(n_rows, 1), np.nan)
    return GradStats(
        names=names,
        group_labels=labels,
        n_rows=n_rows,
        group_loss=group_loss,
        loss=float(loss_sum.sum() / n_total),
        n_batches=n_batches,
        sq=out_sq,
        first=out_first,
        plain=out_plain,
        seconds=time.perf_counter() - t0,
        backward_passes=backward,
    )
