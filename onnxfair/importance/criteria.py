"""Importance criteria: per-weight scores, and per-channel scores of a channel group.

Every criterion gives one score per weight (unstructured pruning ranks these) and one per channel of a
channel group (structured pruning): the channel score sums the per-weight scores of the channel's slices
in the group's WEIGHT members — the Conv/ConvTranspose/Gemm/MatMul weight initializers (producer rows,
consumer columns, depthwise kernels) — gathered at `Member.indices` along `Member.axis`. Biases,
BatchNormalization parameters and statistics and other per-channel vectors are not weights and do not
count. Higher means more important (kept first).

``magnitude`` (data-free)
    weight: |w| (p = 1, default) or w² (p = 2); channel: Σ|w| (p = 1) or sqrt(Σ w²) (p = 2).
``taylor``
    weight: |w · ∂L/∂w| with L the calibration-set mean loss: the signed term w·∂L/∂w is accumulated over
    batches (batch-size weighted) and the absolute value taken at the end; channel: Σ of the weight scores.
``fairgrape`` (Lin et al., ECCV 2022)
    per demographic group g: I_{g,w} = Σ_batches (w · ∂L_{g,b}/∂w)², L_{g,b} the mean loss over the batch
    rows of group g; channel: Σ over its weights, per group ([K, size]). Selection uses the greedy
    share-keeping rule (:mod:`onnxfair.importance.fairgrape`), not a threshold.
    Damped (``--damping c``, onnxfair's option; c = 0 is the paper's): I_{g,w} + c · λ_g · w², with
    λ_g = Σ_w I_{g,w} / Σ_w w² over the initializer's live weights. Σ_b (∂L_{g,b}/∂w)² is a diagonal
    Fisher estimate F_g, so this is the optimal-brain-damage saliency w² · (F_g + c · λ_g) under a Fisher
    damped by c times its w²-weighted mean: unit-free, it leaves each group's share of the initializer's
    importance (the per-layer targets t_g) unchanged, and with per-layer selection c → ∞ gives magnitude's
    ranking. Structured, the same is done per channel group on channel scores: I_{g,ch} + c · λ_g · Σ w²
    over the channel's weight slices, λ_g over the group's live channels (removed channels' producer rows
    keep their values, so a per-initializer λ would count them). At convergence the batch gradients are
    noise from a few misfit rows; undamped, they can pick masks that wreck a well-fit CNN one shot at high
    sparsity (digits ResNet, unstructured 0.9, repair and 4 epochs: 33 % accuracy undamped, 89 % with c = 10).
``conflict`` — onnxfair's own conflict-aware rule (inspired by Ballot, ISSTA 2024, whose exact rule is
    not public). For a unit u (a weight, or a channel) and each group g, the first-order change of the
    group's calibration-set mean loss L_g when u is removed is

        e_{g,u} = −Σ_{w ∈ u} w · ∂L_g/∂w

    where for a channel the sum runs over its slices in the group's CONSUMER weight members (removing a
    channel zeroes exactly those columns; the physically pruned model equals that masked model), or over
    all its weight slices when the group has no consumer weight. The change of the overall loss is
    e_u = Σ_g (n_g/N) e_{g,u}. The fairness objective is the spread of the group losses,
    F = (1/K) Σ_g (L_g − L̄)² with L̄ = (1/K) Σ_g L_g over the K groups present in the calibration set
    (every group counts equally, whatever its size); removing u changes it by

        ΔF_u ≈ (2/K) Σ_g (L_g − L̄) · e_{g,u}.

    A unit with ΔF_u > 0 — its removal would widen the gap between the groups — is needed by the fairness
    objective. Its importance is raised by that need, on the accuracy scale:

        s_u = T_u + λ · max(ΔF_u, 0),   λ = ρ · Σ_u T_u / Σ_u max(ΔF_u, 0)   (per tensor / channel group)

    where T_u is the taylor importance of the unit (|Σ_batches w·∂L/∂w| per weight, summed over the
    channel's weight slices): the signed first-order effect e_u alone cancels across a channel's weights
    and is near zero at a trained minimum, so it ranks accuracy poorly.

    so that, of two units the accuracy objective values alike, the one fairness needs is removed later;
    the fairness term carries a share ρ = CONFLICT_WEIGHT (0.1) of the accuracy term's total. Measured on
    the Adult MLP (structured, 0.5 / 0.7 sparsity), ρ = 1 left 59 % / 24 % accuracy, ρ = 0.25 68 % / 59 %,
    ρ = 0.1 77 % / 76 %, taylor alone 83 % / 75 %: the first-order ΔF is a weak guide to what removal does
    to the group gap, so it is kept a tie-breaker-sized preference. An earlier version removed
    every unprotected unit before any protected one (strict tiers, ranked by |e_u|); at 50-70 % sparsity that
    removed the units accuracy needs most and left the Adult MLP predicting one class, so the protection is
    graded. Strict tiers remain available in select.py for callers that set them; this rule sets none.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from onnxfair.graph.groups import ChannelGroup, Member

__all__ = [
    "CRITERIA",
    "DATA_FREE",
    "magnitude_weights",
    "position_sums",
    "gather_channels",
    "weight_members",
    "channel_sum",
    "channel_alive",
    "conflict_scores",
    "fairness_change",
    "damped",
]

CRITERIA = ("magnitude", "taylor", "fairgrape", "conflict")
DATA_FREE = ("magnitude",)


def magnitude_weights(value: np.ndarray, p: int = 1) -> np.ndarray:
    """|w| for p = 1, w² for p = 2 (channel scores take the square root of the sum for p = 2)."""
    if p not in (1, 2):
        raise ValueError("magnitude norm must be 1 or 2")
    v = np.asarray(value, dtype=np.float64)
    return np.abs(v) if p == 1 else v * v


def damped(scores: np.ndarray, w2: np.ndarray, damping: float) -> np.ndarray:
    """fairgrape's [K, *shape] scores plus damping · λ_g · w2, λ_g = Σ scores[g] / Σ w2 (module docstring).

    w2: the squared weights of the units scored (per weight, or a channel's sum over its weight slices),
    0 for units already removed, so that they stay at 0 and take no part in λ_g."""
    w2 = np.asarray(w2, dtype=np.float64)
    total = w2.sum()
    if total <= 0.0:
        return scores
    lam = scores.reshape(scores.shape[0], -1).sum(axis=1) / total
    return (scores + damping * lam.reshape((-1,) + (1,) * w2.ndim) * w2).astype(scores.dtype, copy=False)


def position_sums(arr: np.ndarray, axis: int, lead: int = 0) -> np.ndarray:
    """Sum over every axis except the `lead` leading axes and `axis` (counted after them): [*lead, D]."""
    a = np.moveaxis(np.asarray(arr), lead + axis, lead)
    return a.reshape(a.shape[: lead + 1] + (-1,)).sum(axis=-1)


def gather_channels(per_position: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per channel: Σ of `per_position[..., indices[c, j]]` over its positions (-1 pads count 0)."""
    D = per_position.shape[-1]
    padded = np.concatenate([per_position, np.zeros(per_position.shape[:-1] + (1,), per_position.dtype)], axis=-1)
    idx = np.where(indices >= 0, indices, D)
    return padded[..., idx].sum(axis=-1)


def _is_weight_shape(shape: Sequence[int], role: str) -> bool:
    if len(shape) < 2:
        return False
    return role in ("producer", "consumer") or sum(d > 1 for d in shape) >= 2


def weight_members(group: ChannelGroup, weights: Iterable[str] | None, shapes: Mapping[str, Sequence[int]]) -> list[Member]:
    """The group's members that are weights: those named in `weights`, or, without a list, members of
    at least two dimensions that are producers/consumers or have two non-unit dims (depthwise kernels;
    per-channel constants such as [1, C, 1, 1] are not weights)."""
    if weights is not None:
        names = set(weights)
        return [m for m in group.members if m.initializer in names]
    return [m for m in group.members if m.initializer in shapes and _is_weight_shape(shapes[m.initializer], m.role)]


def channel_sum(per_weight: Mapping[str, np.ndarray], members: Sequence[Member], size: int, lead: int = 0) -> np.ndarray:
    """Σ over `members` of the per-weight values at each channel's positions: [*lead_shape, size]."""
    out = None
    for m in members:
        arr = per_weight[m.initializer]
        part = gather_channels(position_sums(arr, m.axis, lead), m.indices)
        out = part if out is None else out + part
    if out is None:
        lead_shape = () if lead == 0 else next(iter(per_weight.values())).shape[:lead]
        out = np.zeros(tuple(lead_shape) + (size,))
    return out


def channel_alive(group: ChannelGroup, members: Sequence[Member], alive: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool[size]: False for channels already removed by consumer-side masks.

    A channel counts as removed when every consumer weight member that holds it has all of the
    channel's slices masked (the masks `channel_masks` writes); groups whose consumers carry no mask are
    all alive.
    """
    removed = np.ones(group.size, dtype=bool)
    seen = np.zeros(group.size, dtype=bool)
    for m in members:
        if m.role != "consumer" or m.initializer not in alive:
            continue
        a = np.asarray(alive[m.initializer], dtype=bool)
        pos_alive = position_sums(a.astype(np.int64), m.axis) > 0
        ch_alive = gather_channels(pos_alive.astype(np.int64), m.indices) > 0
        present = m.present()
        seen |= present
        removed &= ~present | ~ch_alive
    return ~(removed & seen)


def fairness_change(effects: np.ndarray, group_loss: np.ndarray, n_rows: np.ndarray) -> np.ndarray:
    """First-order change ΔF of the variance of group losses when each unit is removed, from the per-group
    removal effects e[g, ...] (first-order ΔL_g); groups absent from the data are left out."""
    present = n_rows > 0
    k = int(present.sum())
    if k < 2:
        return np.zeros(effects.shape[1:], dtype=np.float64)
    shape = (-1,) + (1,) * (effects.ndim - 1)
    losses = np.where(present, group_loss, 0.0)
    centred = np.where(present, losses - losses[present].mean(), 0.0)
    return (2.0 / k) * (effects * centred.reshape(shape)).sum(axis=0)


CONFLICT_WEIGHT = 0.1  # share of the total accuracy importance given to the fairness need


def conflict_scores(accuracy: np.ndarray, dF: np.ndarray, weight: float = CONFLICT_WEIGHT) -> np.ndarray:
    """s = accuracy importance + λ·max(ΔF, 0), λ = weight · Σ accuracy / Σ max(ΔF, 0)."""
    need = np.maximum(dF, 0.0)
    total_need = float(need.sum())
    lam = weight * float(accuracy.sum()) / total_need if total_need > 0 else 0.0
    return accuracy + lam * need
