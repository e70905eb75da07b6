"""Fairness-aware bi-level pruning: learn soft mask scores (upper level) and weights (lower level) jointly.

Dai et al. (2023) state the problem as a bi-level program: the upper level chooses the mask, the lower level
the weights that are optimal for that mask, and the objective carries a differentiable fairness penalty.
They leave the penalty's sign, its surrogate and the binarisation open; this module fixes them as follows.

Units and soft masks
    structured   one real score s per channel of each ChannelGroup. The soft mask m = sigmoid(s / T) scales
                 the group's CONSUMER-side members at that channel (the columns that read it, via
                 Member.indices), i.e. exactly the positions the hard rewrite removes. A group without
                 consumer members scales its producer members instead (an approximation: a following
                 per-channel shift is not removed). Parameters touched by several groups get the product.
    unstructured one score per weight of each named initializer; m = sigmoid(s / T) is its mask.
    Scores start at ``init_score`` for every unit (no magnitude prior), so only the objective orders them.
    T anneals geometrically from ``t_start`` to ``t_end`` over the steps, so m approaches 0/1.

Objective (per training batch)
    L(s, w) = J + α · P + ρ · B
    J   mean cross-entropy (or the pw loss with ``loss="pw"``) over the batch;
    P   the spread of the per-group mean losses J_g over the groups present in the batch:
        ``penalty="variance"``: mean_g (J_g − mean_g' J_g')² (unweighted over groups),
        ``penalty="range"``: max_g J_g − min_g J_g.
        P is added with a positive sign: a mask that raises one group's loss above the others' is penalised.
    B   budget: ``scope="layer"``: mean over units u of (mean(m_u) − keep_fraction)²;
        ``scope="global"``: (mean of all soft masks − keep_fraction)². B does not depend on w.
        keep_fraction is 1 − sparsity (or derived from target_macs, see Binarisation).

Bi-level approximation (first order)
    Each step takes one training batch and does a lower step, then an upper step, on it:
      lower  w ← Adam(w, ∇_w (J + α P)) with the soft masks detached (the lower problem for fixed s);
      upper  s ← Adam(s, ∇_s L) at the updated weights, with w fixed.
    This alternating scheme drops the implicit term ∂w*(s)/∂s of the exact bi-level gradient (the usual
    first-order approximation). ``update_weights=False`` skips the lower step (mask learning only).
    The interpreter applies masks as detached multipliers (w_eff = w · m), so ∇_s is assembled from the
    parameter gradients: ∂L/∂w = g · m with g = ∂L/∂w_eff, hence ∂L/∂s = g · w · ∂m/∂s
    = (∂L/∂w · w) · ∂(log m)/∂s, with log m from logsigmoid (exact, stable, no division by m).

Binarisation (onnxfair.select, the selection every method uses)
    The final scores s become a :class:`onnxfair.importance.Scores` (criterion "bilevel", every unit alive)
    and go through :func:`onnxfair.select.select_channels` (structured) or
    :func:`onnxfair.select.select_weights` (unstructured) with the run's budget, scope and round_to, so
    counts, rounding, Split/Slice parts (each keeps a channel) and ties (lower index kept) are exactly the
    other methods': layer scope keeps size − round(sparsity · size) units of each group or initializer
    (channel counts through round_keep); global scope ranks all units together, and the rounded channel
    counts are adjusted block by block so the total kept is at most total − round(sparsity · total), as
    close as round_to allows (exact for round_to 1 and for weights; no group goes below round_to channels
    or one per Split/Slice part, which can set a floor above the budget).
    One deliberate difference: the global ranking uses s as learned (``normalise=False``), not divided by
    each layer's mean score. The scores share one temperature and, in global scope, one budget term, so
    they are on one scale already; they are logits and may be negative, so a layer's mean is no scale
    (and the division would apply to some layers only: select.py divides by positive means alone).
    ``target_macs`` (structured only): select_channels meets the MAC target (checked on the real cost when
    ``macs_fn`` is given). Training needs a keep fraction for B; it is the one that the linear MAC estimate
    (group.macs / size per channel, MACs outside the groups fixed) gives when every group keeps the same
    fraction of its channels.
    Afterwards the hard masks are set on the module (consumer-side for channels, the same masks as the graph
    layer's channel_masks), and ``finetune_epochs > 0`` runs a short fine-tune with them
    (:func:`onnxfair.finetune.finetune`). The module's weights are left as trained; write them back with
    ``mod.to_onnx`` before the rewrite to keep the lower level's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import torch

from onnxfair.data import GroupedDataset
from onnxfair.errors import DataError, UsageError
from onnxfair.finetune import (
    DENSE_REFERENCE_LOSSES,
    LOSSES,
    FinetuneResult,
    batch_losses,
    finetune,
    group_means,
    model_device,
    predict_probs,
    statistics_names,
    validation_stats,
    module_model,
)
from onnxfair.graph.groups import ChannelGroup
from onnxfair.importance.scores import Scores
from onnxfair.select import select_channels, select_weights

PENALTIES = ("variance", "range")


@dataclass
class BilevelResult:
    """The binarised selection plus the learned scores and a per-step log."""

    structured: bool
    keep: dict[int, np.ndarray] | None = None  # structured: group id -> sorted kept channel indices
    masks: dict[str, np.ndarray] | None = None  # unstructured: initializer -> float32 0/1 mask
    scores: dict = field(default_factory=dict)  # group id / initializer -> final scores (numpy)
    history: list[dict] = field(default_factory=list)
    val: dict | None = None  # val accuracy and per-group accuracy of the binarised model (before fine-tune)
    finetune: FinetuneResult | None = None

    @property
    def selection(self) -> dict:
        """What the rewrite takes: keep-sets (structured) or 0/1 masks (unstructured)."""
        return self.keep if self.structured else self.masks


class _ChannelMasker:
    """Spreads per-channel values of every group onto the parameters they mask (consumer side).

    ``masks`` multiplies the factors of all groups touching a parameter; ``log_masks`` adds their logs.
    Positions padded with -1 (a channel this initializer does not hold) are skipped.
    """

    def __init__(self, mod, groups: Sequence[ChannelGroup]):
        self.groups = list(groups)
        self.device = model_device(mod)
        self.shapes = {n: tuple(p.shape) for n, p in mod.params.items()}
        # (group index, initializer, axis, positions along the axis, channel of each position)
        self.entries: list[tuple[int, str, int, torch.Tensor, torch.Tensor]] = []
        for gi, grp in enumerate(self.groups):
            members = grp.consumers() or grp.producers()
            if not members:
                raise UsageError(f"channel group {grp.id} ({grp.name}) has no producer or consumer members to mask")
            for m in members:
                if m.initializer not in self.shapes:
                    raise UsageError(f"group {grp.id} names {m.initializer!r}, which is not a float initializer")
                idx = np.asarray(m.indices).reshape(grp.size, -1)
                chan = np.repeat(np.arange(grp.size), idx.shape[1])
                flat = idx.reshape(-1)
                ok = flat >= 0
                pos = torch.as_tensor(flat[ok], dtype=torch.long, device=self.device)
                ch = torch.as_tensor(chan[ok], dtype=torch.long, device=self.device)
                self.entries.append((gi, m.initializer, int(m.axis) % len(self.shapes[m.initializer]), pos, ch))

    def _spread(self, per_group: Sequence[torch.Tensor], log: bool) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for gi, name, axis, pos, chan in self.entries:
            shape = self.shapes[name]
            vals = per_group[gi]
            base = torch.zeros if log else torch.ones
            vec = base(shape[axis], dtype=vals.dtype, device=vals.device).index_put((pos,), vals[chan])
            view = [1] * len(shape)
            view[axis] = shape[axis]
            factor = vec.reshape(view)
            if name not in out:
                out[name] = factor
            else:
                out[name] = out[name] + factor if log else out[name] * factor
        return {n: m.expand(self.shapes[n]) for n, m in out.items()}

    def masks(self, per_group: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._spread(per_group, log=False)

    def log_masks(self, per_group_log: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._spread(per_group_log, log=True)


def mask_gradient_surrogate(mod, log_masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the mask scores is dL/ds, given parameter gradients already filled by
    a backward pass through the interpreter with masks m set: Σ (∂L/∂w · w) · log m (see module docstring)."""
    total = None
    for n, lm in log_masks.items():
        p = mod.params[n]
        if p.grad is None:
            continue
        term = ((p.grad * p).detach() * lm).sum()
        total = term if total is None else total + term
    if total is None:
        return sum(lm.sum() * 0.0 for lm in log_masks.values())
    return total


def _temperature(step: int, steps: int, t_start: float, t_end: float) -> float:
    if steps <= 1:
        return t_end
    return t_start * (t_end / t_start) ** (step / (steps - 1))


def _spread(jg: torch.Tensor, present: torch.Tensor, kind: str) -> torch.Tensor:
    vals = jg[present]
    if vals.numel() < 2:
        return jg.sum() * 0.0
    if kind == "variance":
        return ((vals - vals.mean()) ** 2).mean()
    return vals.max() - vals.min()


def learned_scores(units: Sequence[ChannelGroup] | Sequence[str], final: Mapping) -> Scores:
    """The learned mask scores as the selection's input: channel scores per group id (structured) or weight
    scores per initializer (unstructured), every unit alive (bi-level starts from the dense model)."""
    structured = bool(units) and isinstance(units[0], ChannelGroup)
    if structured:
        channels = {g.id: np.asarray(final[g.id], np.float64) for g in units}
        return Scores(criterion="bilevel", structured=True, weights={}, weight_alive={}, channels=channels,
                      channel_alive={gid: np.ones(sc.shape, bool) for gid, sc in channels.items()})
    weights = {n: np.asarray(final[n], np.float64) for n in units}
    return Scores(criterion="bilevel", structured=False, weights=weights,
                  weight_alive={n: np.ones(sc.shape, bool) for n, sc in weights.items()})


def macs_keep_fraction(groups: Sequence[ChannelGroup], target_macs: float, dense_macs: float | None = None) -> float:
    """Training's channel keep fraction for a MAC target: the fraction f, the same in every group, whose
    linear estimate (fixed MACs outside the groups + f · the groups' MACs) is target_macs of the dense MACs."""
    grouped = float(sum(g.macs for g in groups))
    total = dense_macs
    if total is None:
        total = next((g.macs / g.macs_share for g in groups if g.macs > 0 and g.macs_share > 0), None)
    if total is None or grouped <= 0:
        raise UsageError("the channel groups carry no MAC counts; pass dense_macs (or give input shapes)")
    total = float(total)
    fraction = (target_macs * total - (total - grouped)) / grouped
    if fraction <= 0:
        raise UsageError(f"--target-macs {target_macs} cannot be met: the layers outside the channel groups alone "
                         f"use {(total - grouped) / total:.3f} of the MACs; raise the target")
    return min(fraction, 1.0)


def bilevel_prune(
    mod,
    units: Sequence[ChannelGroup] | Sequence[str],
    train: GroupedDataset,
    val: GroupedDataset | None,
    *,
    sparsity: float | None = None,
    target_macs: float | None = None,
    macs_fn: Callable[[dict[int, np.ndarray]], float] | None = None,
    dense_macs: float | None = None,
    steps: int = 200,
    scope: str = "layer",
    round_to: int = 1,
    alpha: float = 1.0,
    rho: float = 10.0,
    penalty: str = "variance",
    loss: str = "ce",
    beta: float = 0.75,
    gamma: float = 5.0,
    score_lr: float = 0.05,
    weight_lr: float = 1e-3,
    t_start: float = 1.0,
    t_end: float = 0.05,
    init_score: float = 2.0,
    batch_size: int = 64,
    seed: int = 0,
    update_weights: bool = True,
    dense_probs: np.ndarray | None = None,
    model=None,
    finetune_epochs: int = 0,
    finetune_loss: str = "ce",
    finetune_lr: float = 1e-3,
    progress: Callable[[str], None] | None = None,
    fixed_weights: Collection[str] = (),
) -> BilevelResult:
    """Learn masks and weights jointly with a group-loss spread penalty; return the binarised selection.

    `units` is a list of ChannelGroup (structured: returns `keep`, group id -> kept channel indices) or of
    initializer names (unstructured: returns `masks`, name -> 0/1 array). `mod` is the interpreter of the
    dense model (`model`, the ONNX model it was built from, keeps BatchNormalization statistics frozen);
    its parameters are trained in place (lower level) and the hard masks are left set on it.
    The budget is `sparsity` (fraction removed) or, structured only, `target_macs` (fraction of MACs kept;
    `macs_fn` and `dense_macs` as in :func:`onnxfair.select.select_channels`). `fixed_weights` (initializers
    --ignore keeps untouched) are never trained.
    """
    if (sparsity is None) == (target_macs is None):
        raise UsageError("give exactly one budget: sparsity (fraction removed) or target_macs (fraction of MACs kept)")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise UsageError(f"sparsity {sparsity} is outside [0, 1)")
    if target_macs is not None and not 0.0 < target_macs <= 1.0:
        raise UsageError(f"target_macs {target_macs} is outside (0, 1]")
    if steps < 1:
        raise UsageError(f"bilevel steps {steps} must be at least 1")
    if scope not in ("layer", "global"):
        raise UsageError(f"unknown scope {scope!r}; use layer or global")
    if penalty not in PENALTIES:
        raise UsageError(f"unknown fairness penalty {penalty!r}; choose one of {', '.join(PENALTIES)}")
    if loss not in ("ce", "pw"):
        raise UsageError(f"bilevel loss {loss!r} is not supported; use ce or pw")
    if finetune_loss not in LOSSES:
        raise UsageError(f"unknown fine-tune loss {finetune_loss!r}; choose one of {', '.join(LOSSES)}")
    if not 0.0 < t_end <= t_start:
        raise UsageError("temperatures must satisfy 0 < t_end <= t_start")
    if len(train) == 0:
        raise DataError("bilevel pruning needs a non-empty training part")
    units = list(units)
    if not units:
        raise UsageError("nothing to prune: no channel groups or weight names given")
    structured = isinstance(units[0], ChannelGroup)
    if any(isinstance(u, ChannelGroup) != structured for u in units):
        raise UsageError("units mixes channel groups and weight names")
    if target_macs is not None and not structured:
        raise UsageError("target_macs needs channel groups: zeros do not reduce MACs; use sparsity for weights")
    keep_fraction = 1.0 - sparsity if sparsity is not None else macs_keep_fraction(units, target_macs, dense_macs)
    say = progress or (lambda s: None)
    device = model_device(mod)
    n_groups = len(train.group_labels)

    # dense references, taken before any mask or weight change
    mod.set_masks(None)
    if dense_probs is None and (loss == "pw" or (finetune_epochs > 0 and finetune_loss in DENSE_REFERENCE_LOSSES)):
        dense_probs = predict_probs(mod, train)
    dense_val_probs = None
    if finetune_epochs > 0 and finetune_loss == "ceag" and val is not None and len(val):
        dense_val_probs = predict_probs(mod, val)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if structured:
        masker = _ChannelMasker(mod, units)
        scores = [torch.full((g.size,), float(init_score), device=device, requires_grad=True) for g in units]
    else:
        for n in units:
            if n not in mod.params:
                raise UsageError(f"{n!r} is not a float initializer of the model")
        scores = [
            torch.full(tuple(mod.params[n].shape), float(init_score), device=device, requires_grad=True) for n in units
        ]

    def masks_of(values: list[torch.Tensor], log: bool = False) -> dict[str, torch.Tensor]:
        if structured:
            return masker.log_masks(values) if log else masker.masks(values)
        return dict(zip(units, values))

    frozen = statistics_names(model if model is not None else module_model(mod))
    wnames = [n for n, p in mod.params.items() if n not in frozen and n not in fixed_weights and p.is_floating_point()]
    saved_flags = {n: p.requires_grad for n, p in mod.params.items()}
    w_opt = torch.optim.Adam([mod.params[n] for n in wnames], lr=weight_lr) if update_weights else None
    s_opt = torch.optim.Adam(scores, lr=score_lr)

    def forward_objective(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        per_row, _logits, g = batch_losses(mod, train, idx, device, loss, dense_probs, beta, gamma)
        jg, counts = group_means(per_row, g, n_groups)
        return per_row.mean(), _spread(jg, counts > 0, penalty)

    def budget(ms: list[torch.Tensor]) -> torch.Tensor:
        if scope == "layer":
            return torch.stack([(m.mean() - keep_fraction) ** 2 for m in ms]).mean()
        return (sum(m.sum() for m in ms) / sum(m.numel() for m in ms) - keep_fraction) ** 2

    def zero_param_grads() -> None:
        for p in mod.params.values():
            p.grad = None

    order = np.zeros(0, np.int64)
    pos = 0
    log_every = max(1, steps // 10)
    history: list[dict] = []
    try:
        for n, p in mod.params.items():
            p.requires_grad_(n in wnames)
        for step in range(steps):
            if pos + batch_size > len(order):  # a seeded reshuffle for each pass over the data
                order, pos = rng.permutation(len(train)), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            temp = _temperature(step, steps, t_start, t_end)
            with torch.no_grad():
                mod.set_masks(masks_of([torch.sigmoid(s / temp) for s in scores]))
            if update_weights:  # lower level: weights under the current soft masks
                zero_param_grads()
                j, p = forward_objective(idx)
                (j + alpha * p).backward()
                w_opt.step()
            # upper level at the updated weights. The interpreter multiplies parameters by detached masks,
            # so dL/ds is assembled from the parameter gradients: with w_eff = w * m, grad_w = g * m and
            # dL/ds = g * w * dm/ds = (grad_w * w) * d(log m)/ds  (log m via logsigmoid: stable, no division).
            zero_param_grads()
            j, p = forward_objective(idx)
            (j + alpha * p).backward()
            surrogate = mask_gradient_surrogate(
                mod, masks_of([torch.nn.functional.logsigmoid(s / temp) for s in scores], log=True)
            )
            ms = [torch.sigmoid(s / temp) for s in scores]
            b = budget(ms)
            s_opt.zero_grad(set_to_none=False)
            (surrogate + rho * b).backward()
            s_opt.step()
            zero_param_grads()
            if step % log_every == 0 or step == steps - 1:
                soft_keep = float(sum(m.detach().sum() for m in ms) / sum(m.numel() for m in ms))
                rec = {"step": step, "temperature": temp, "loss": float(j.detach()), "penalty": float(p.detach()),
                       "budget": float(b.detach()), "soft_keep": soft_keep}
                history.append(rec)
                say(f"bilevel step {step}: T {temp:.3f}, loss {rec['loss']:.4f}, penalty {rec['penalty']:.4f}, "
                    f"soft keep {soft_keep:.3f}")
    finally:
        zero_param_grads()
        for n, p in mod.params.items():
            p.requires_grad_(saved_flags[n])

    final = [s.detach().cpu().numpy().astype(np.float64) for s in scores]
    score_map = {(g.id if structured else g): sc for g, sc in zip(units, final)}
    learned = learned_scores(units, score_map)
    if structured:
        budget = {"sparsity": sparsity} if sparsity is not None else {"target_macs": target_macs}
        keep = select_channels(learned, units, scope=scope, round_to=round_to, macs_fn=macs_fn,
                               dense_macs=dense_macs, normalise=False, **budget)
        hard = []
        for g in units:
            v = torch.zeros(g.size, device=device)
            v[torch.as_tensor(keep[g.id], dtype=torch.long, device=device)] = 1.0
            hard.append(v)
        hard_masks = {n: m.contiguous() for n, m in masker.masks(hard).items()}
        res = BilevelResult(structured=True, keep=keep, scores=score_map)
    else:
        masks_np = select_weights(learned, sparsity, scope=scope, normalise=False)
        hard_masks = {n: torch.from_numpy(m).to(device) for n, m in masks_np.items()}
        res = BilevelResult(structured=False, masks=masks_np, scores=score_map)
    res.history = history
    mod.set_masks(hard_masks)
    if val is not None and len(val):
        stats = validation_stats(mod, val, n_groups, 256)
        res.val = {
            "accuracy": stats.accuracy,
            "groups": {lab: float(a) for lab, a in zip(val.group_labels, stats.group_accuracy) if np.isfinite(a)},
        }
        say(f"bilevel: binarised model val accuracy {stats.accuracy:.4f}")
    if finetune_epochs > 0:
        if val is None or not len(val):
            raise UsageError("the fine-tune after bilevel pruning needs a validation part")
        res.finetune = finetune(
            mod, train, val, masks=hard_masks, epochs=finetune_epochs, loss=finetune_loss, lr=finetune_lr,
            batch_size=batch_size, seed=seed, dense_probs=dense_probs, dense_val_probs=dense_val_probs,
            model=model, progress=progress, beta=beta, gamma=gamma, trainable=wnames,
        )
    return res
