"""`compute_scores`: run one criterion on the interpreter and return per-weight and per-channel scores."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from onnxfair.errors import DataError, ModelError, UsageError
from onnxfair.graph.groups import ChannelGroup
from onnxfair.importance import criteria as C
from onnxfair.importance.engine import accumulate_gradients, dense_probabilities, resolve_device
from onnxfair.losses import LOSS_KINDS

__all__ = ["Scores", "compute_scores", "live_weights"]


@dataclass
class Scores:
    """Importance of every prunable unit; higher is more important.

    weights        initializer name -> per-weight score (the initializer's shape; [K, *shape] for fairgrape)
    weight_alive   initializer name -> bool, False where the weight is already masked (scores 0 there)
    channels       channel group id -> per-channel score ([size]; [K, size] for fairgrape)
    channel_alive  channel group id -> bool[size], False for channels already removed
    weight_tier / channel_tier   conflict only: 1 = protected (removed after every tier-0 unit)
    group_labels   the demographic groups (fairgrape's K rows, conflict's groups)
    info           calibration statistics: rows and mean loss per group, passes, seconds, conventions
    """

    criterion: str
    structured: bool
    weights: dict[str, np.ndarray]
    weight_alive: dict[str, np.ndarray]
    channels: dict[int, np.ndarray] = field(default_factory=dict)
    channel_alive: dict[int, np.ndarray] = field(default_factory=dict)
    weight_tier: dict[str, np.ndarray] | None = None
    channel_tier: dict[int, np.ndarray] | None = None
    group_labels: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def per_group(self) -> bool:
        """True when scores have a leading demographic-group axis (fairgrape)."""
        return self.criterion == "fairgrape"


def _numpy(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def live_weights(params: Mapping[str, Any], names: Iterable[str], masks: Mapping[str, Any] | None = None,
                 zeros_removed: bool = True) -> dict[str, np.ndarray]:
    """name -> bool, False where a weight is masked or (`zeros_removed`) already exactly zero.

    Unstructured, zeros already in the model count as removed: re-pruning a sparse model must not spend its
    budget keeping them while live weights of equal (zero) score go, which would zero more than asked.
    Structured pruning passes False: a channel is removed by the masks alone (its zero weights do not remove
    it; a group whose consumer weights are all zero would otherwise have no channel left to keep).
    """
    alive = {}
    for n in names:
        m = masks.get(n) if masks else None
        live = _numpy(params[n]) != 0 if zeros_removed else np.ones(tuple(params[n].shape), dtype=bool)
        alive[n] = live if m is None else live & (_numpy(m) != 0)
    return alive


def compute_scores(
    criterion: str,
    mod: Any,
    dataset: Any = None,
    *,
    groups: Sequence[ChannelGroup] | None = None,
    weights: Iterable[str] | None = None,
    masks: Mapping[str, Any] | None = None,
    loss: str = "ce",
    beta: float = 0.75,
    gamma: float = 5.0,
    dense_probs: np.ndarray | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    p: int = 1,
    accumulate_dtype: torch.dtype = torch.float32,
    damping: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> Scores:
    """Score every prunable unit of `mod` (an `OnnxModule`, or any module with `.params`).

    criterion   "magnitude" | "taylor" | "fairgrape" | "conflict" (see `criteria`)
    dataset     a GroupedDataset (`batches`, `group_labels`); not needed for magnitude
    groups      channel groups (structured): channel scores for each; None scores weights only
    weights     unstructured: the initializers to score (the caller decides what is prunable; default
                every parameter of two or more dimensions). Structured: which initializers count as
                weights inside a group (default: see `criteria.weight_members`).
    masks       the masks to score under (None: the dense model). They are set on `mod` with
                `set_masks` and stay set; masked weights, and (unstructured) weights already exactly zero,
                score 0 and are marked not alive.
    loss        "ce" or "pw"; pw needs `dense_probs` from the dense model (computed here, with the masks
                cleared, when not given — pass them in iterative runs so they stay the dense model's)
    device      None keeps `mod` where it is, else it is moved ("auto", "cpu", "cuda")
    damping     fairgrape only: add damping * lambda_g * w^2 to each group's scores, per weight (unstructured)
                or per channel (structured; see `criteria`); 0 is the paper's importance
    """
    if criterion not in C.CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}; choose one of {', '.join(C.CRITERIA)}")
    if damping < 0 or not np.isfinite(damping):
        raise UsageError(f"damping {damping} must be a finite number >= 0 (0: the paper's fairgrape importance)")
    if damping and criterion != "fairgrape":
        raise UsageError(f"damping applies to the fairgrape criterion only, not {criterion}; drop it or use fairgrape")
    if loss not in LOSS_KINDS:
        raise UsageError(f"unknown loss {loss!r}; choose one of {', '.join(LOSS_KINDS)}")
    t0 = time.perf_counter()
    dev = resolve_device(device, mod)
    mod.to(dev)
    if masks is not None or hasattr(mod, "set_masks"):
        if not hasattr(mod, "set_masks"):
            raise UsageError("masks given, but the module has no set_masks")
        mod.set_masks(masks)
    params = mod.params
    shapes = {n: tuple(v.shape) for n, v in params.items()}
    structured = groups is not None
    if structured:
        wlist = list(weights) if weights is not None else None
        members = {g.id: C.weight_members(g, wlist, shapes) for g in groups}
        names = list(dict.fromkeys(m.initializer for g in groups for m in members[g.id]))
        missing = [n for n in names if n not in params]
        if missing:
            raise UsageError(f"channel groups name initializers the module lacks: {', '.join(missing[:5])}")
    else:
        names = list(dict.fromkeys(weights)) if weights is not None else [n for n, s in shapes.items() if len(s) >= 2]
        missing = [n for n in names if n not in params]
        if missing:
            raise UsageError(f"not float initializers of the model: {', '.join(missing[:5])}")
    if not names:
        raise UsageError("nothing to score: no prunable weights")

    alive = live_weights(params, names, masks, zeros_removed=not structured)

    info: dict[str, Any] = {"criterion": criterion}
    labels: list[str] = []
    per_weight: dict[str, np.ndarray] = {}
    tiers: dict[str, np.ndarray] | None = None
    first: dict[str, np.ndarray] | None = None
    stats = None
    if criterion == "magnitude":
        info["norm"] = f"L{p}"
        for n in names:
            per_weight[n] = C.magnitude_weights(_numpy(params[n]), p) * alive[n]
    else:
        if dataset is None:
            raise UsageError(f"the {criterion} criterion needs calibration data (pass --data and --groups)")
        if len(dataset) == 0:
            raise DataError("the calibration set is empty")
        if loss == "pw" and dense_probs is None:
            has_masks = hasattr(mod, "set_masks")
            if has_masks:
                mod.set_masks(None)
            dense_probs = dense_probabilities(mod, dataset, batch_size=max(batch_size, 256))
            if has_masks:
                mod.set_masks(masks)
        stats = accumulate_gradients(
            mod, dataset, names,
            sq=criterion == "fairgrape", first=criterion == "conflict", plain=criterion in ("taylor", "conflict"),
            loss=loss, dense_probs=dense_probs, beta=beta, gamma=gamma, batch_size=batch_size,
            accumulate_dtype=accumulate_dtype, progress=progress,
        )
        labels = stats.group_labels
        info.update(loss=loss, n_rows={l: int(c) for l, c in zip(labels, stats.n_rows)},
                    group_loss={l: float(v) for l, v in zip(labels, stats.group_loss)}, mean_loss=stats.loss,
                    batches=stats.n_batches, backward_passes=stats.backward_passes, gradient_seconds=stats.seconds)
        if loss == "pw":
            info.update(beta=beta, gamma=gamma)
        if criterion == "taylor":
            info["convention"] = "|w * dL/dw| of the calibration-set mean loss (signed sum over batches, abs at the end)"
            for n in names:
                per_weight[n] = np.abs(stats.plain[n]) * alive[n]
        elif criterion == "fairgrape":
            info["convention"] = "I[g, w] = sum over batches of (w * dL_g/dw)^2, L_g the batch mean loss of group g"
            if damping:
                info["damping"] = damping
                info["convention"] += ("; plus damping * lambda_g * w^2, lambda_g = total of I[g] / total of w^2 over the "
                                       "live weights of the initializer (unstructured) or channels of the group (structured)")
            for n in names:
                per_weight[n] = stats.sq[n] * alive[n]
                if damping and not structured:
                    w2 = np.square(_numpy(params[n]) * alive[n], dtype=np.float64)
                    per_weight[n] = C.damped(per_weight[n], w2, damping)
        else:
            info["convention"] = "onnxfair conflict rule: |dL| + lambda * max(dF, 0), F the variance of group losses"
            first = {}
            taylor = {}
            for n in names:
                first[n] = stats.first[n] * alive[n]
                taylor[n] = np.abs(stats.plain[n]) * alive[n]
                dF = C.fairness_change(-first[n], stats.group_loss, stats.n_rows)
                per_weight[n] = C.conflict_scores(taylor[n], dF)

    not_finite = [n for n, v in per_weight.items() if not np.isfinite(v).all()]
    if not_finite:
        raise ModelError(
            f"importance scores are NaN or infinite for {', '.join(not_finite[:3])}: the model's weights or its "
            "loss on the calibration data are not finite; check the model with `onnxfair evaluate` and the data's scale"
        )
    scores = Scores(criterion=criterion, structured=structured, weights=per_weight, weight_alive=alive,
                    weight_tier=tiers if not structured else None, group_labels=labels, info=info)
    if structured:
        if damping:
            squares = {n: np.square(_numpy(params[n]) * alive[n], dtype=np.float64) for n in names}
        for g in groups:
            mem = members[g.id]
            ch_alive = C.channel_alive(g, mem, alive)
            if criterion == "fairgrape":
                ch = C.channel_sum(per_weight, mem, g.size, lead=1)
                if damping:
                    ch = C.damped(ch * ch_alive, C.channel_sum(squares, mem, g.size) * ch_alive, damping)
            elif criterion == "magnitude" and p == 2:
                ch = np.sqrt(C.channel_sum(per_weight, mem, g.size))
            elif criterion == "conflict":
                cons = [m for m in mem if m.role == "consumer"] or list(mem)
                dF = C.fairness_change(-C.channel_sum(first, cons, g.size, lead=1), stats.group_loss, stats.n_rows)
                ch = C.conflict_scores(C.channel_sum(taylor, mem, g.size), dF)
            else:
                ch = C.channel_sum(per_weight, mem, g.size)
            scores.channels[g.id] = np.where(ch_alive, ch, 0.0)
            scores.channel_alive[g.id] = ch_alive
        info["channel_members"] = "weight members only (Conv/ConvTranspose/Gemm/MatMul weights)"
    info["seconds"] = time.perf_counter() - t0
    return scores
