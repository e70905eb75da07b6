"""Per-row training losses shared by importance scoring, fine-tuning and the risk pre-check.

``ce``
    Cross-entropy of the logits against the integer label.
``pw`` (performance-weighted loss, Meyer & Wong 2022)
    Row i gets the sample weight ``w_i = β + (1 − β)(1 − p_i)^γ``, where ``p_i`` is the DENSE model's
    probability of the true label, so rows the dense model found hard weigh more. The target is the dense
    model's softmax output where the dense model's arg-max is the label, else the one-hot label (a
    distillation target that never teaches a mistake). The per-row loss is ``w_i · CE(soft target_i)``
    with ``CE(q) = −Σ_c q_c log softmax(logits)_c``; ``reduction="mean"`` averages it over the rows.
    Defaults β = 0.75, γ = 5 (the paper's reference command line). ``dense_probs`` must come from the
    dense model before any masking (compute it once and keep it for every later step).

Logits of shape [N] or [N, 1] are read as one binary logit z and treated as the two-class logits [0, z]
(softmax([0, z])[1] = sigmoid(z)), so binary models exported with a single output work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxfair.errors import UsageError

__all__ = ["LOSS_KINDS", "as_class_logits", "pw_sample_weights", "pw_targets", "loss_fn"]

LOSS_KINDS = ("ce", "pw")


def as_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """[N, C] class scores; a single binary logit (shape [N] or [N, 1]) becomes [N, 2] = [0, z]."""
    if logits.ndim == 1:
        logits = logits[:, None]
    logits = logits.reshape(logits.shape[0], -1)
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def _check_probs(dense_probs: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    dense_probs = torch.as_tensor(dense_probs)
    if dense_probs.ndim != 2 or dense_probs.shape[0] != y.shape[0]:
        raise UsageError(f"dense_probs has shape {tuple(dense_probs.shape)}; expected [{y.shape[0]}, classes]")
    if dense_probs.shape[1] != n_classes:
        raise UsageError(f"dense_probs has {dense_probs.shape[1]} classes, the logits {n_classes}")
    return dense_probs


def pw_sample_weights(dense_probs: torch.Tensor, y: torch.Tensor, beta: float = 0.75, gamma: float = 5.0) -> torch.Tensor:
    """w_i = β + (1 − β)(1 − p_i)^γ with p_i = dense_probs[i, y_i]."""
    p_true = dense_probs.gather(1, y.long()[:, None]).squeeze(1)
    return beta + (1.0 - beta) * (1.0 - p_true).clamp(min=0.0) ** gamma


def pw_targets(dense_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft targets: the dense distribution where the dense arg-max equals the label, else one-hot."""
    onehot = F.one_hot(y.long(), dense_probs.shape[1]).to(dense_probs.dtype)
    right = dense_probs.argmax(dim=1) == y
    return torch.where(right[:, None], dense_probs, onehot)


def loss_fn(
    logits: torch.Tensor,
    y: torch.Tensor,
    dense_probs: torch.Tensor | None = None,
    kind: str = "ce",
    beta: float = 0.75,
    gamma: float = 5.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-row (`reduction="none"`) or mean loss of `kind` ("ce" or "pw"); see the module docstring."""
    if reduction not in ("none", "mean"):
        raise UsageError(f"unknown reduction {reduction!r}; use 'none' or 'mean'")
    logits = as_class_logits(logits)
    y = torch.as_tensor(y, device=logits.device).long().reshape(-1)
    if y.shape[0] != logits.shape[0]:
        raise UsageError(f"{y.shape[0]} labels for {logits.shape[0]} rows of logits")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):  # a symbolic class dim is known only now
        from onnxfair.data import check_labels

        check_labels(y.cpu().numpy(), logits.shape[1])
    if kind == "ce":
        per_row = F.cross_entropy(logits, y, reduction="none")
    elif kind == "pw":
        if dense_probs is None:
            raise UsageError("the pw loss needs the dense model's probabilities (dense_probs)")
        dp = _check_probs(dense_probs, y, logits.shape[1]).to(device=logits.device, dtype=logits.dtype)
        if not 0.0 <= beta <= 1.0 or gamma < 0:
            raise UsageError(f"pw needs 0 <= beta <= 1 and gamma >= 0 (got beta={beta}, gamma={gamma})")
        weights = pw_sample_weights(dp, y, beta, gamma)
        targets = pw_targets(dp, y)
        per_row = weights * -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    else:
        raise UsageError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    return per_row if reduction == "none" else per_row.mean()
