"""Fairness-aware bi-level pruning: learn mask scores (upper level) and weights (lower level) jointly.

Dai et al. (2023) state the problem as a bi-level program: the upper level chooses the mask, the lower level
the weights that are optimal for that mask, and the objective carries a differentiable fairness penalty.
They leave the mask's parametrisation, the penalty's surrogate and the binarisation open; this module fixes
them as follows.

Hard masks, straight-through scores
    Every unit (a weight, unstructured; a channel of a ChannelGroup, structured) has a real score s. Each
    step the forward pass uses the HARD mask of the current scores: the units the run's selection keeps at
    its budget. The network therefore always runs at the budget it will be written at. An earlier design
    used soft masks sigmoid(s / T) with a budget penalty: on an exported CNN, whose BatchNorm is folded
    away, a soft mask rescales every layer's output (0.88 per layer at the start, 16 layers deep), the
    lower level trained the weights for that rescaled network, and binarising broke it (digits ResNet at
    0.5: 10 % accuracy, magnitude 94 %).
    The scores get the straight-through gradient of the mask: ∂L/∂m = g · w, g the gradient at the
    effective (masked) weight, w the stored weight, so a removed unit still learns what bringing it back
    would do (a channel sums g · w over the positions its mask covers). Each step moves every layer's
    (initializer's or group's) scores by ``score_lr`` times that gradient divided by its root mean square
    over the layer, so every layer moves at the same pace whatever its gradient scale; plain sign-based
    steps (Adam) let batch noise reorder ~10^5 near-tied scores.
    Scores start at the magnitude criterion's ranking, log(|w| / the layer's mean |w|) (channels: the
    magnitude channel score), so the first hard mask is magnitude's own at the budget (layer or global
    scope), and the objective moves units across the threshold from there.

Objective (per training batch)
    L(m, w) = J + α · P
    J   mean cross-entropy (or the pw loss with ``loss="pw"``) over the batch;
    P   the spread of the per-group mean losses J_g over the groups present in the batch:
        ``penalty="variance"``: mean_g (J_g − mean_g' J_g')² (unweighted over groups),
        ``penalty="range"``: max_g J_g − min_g J_g.
        P is added with a positive sign: a mask that raises one group's loss above the others' is penalised.
    The budget needs no penalty term: the hard mask meets it at every step.

Bi-level approximation (first order)
    One backward pass per step gives both levels their gradient at the current mask:
      lower  w ← Adam(w, ∇_w L ⊙ m): the kept weights train for this mask (removed ones keep their values);
      upper  s ← s − score_lr · (g · w) / rms, per layer.
    The implicit term ∂w*(s)/∂s of the exact bi-level gradient is dropped (the usual first-order
    approximation). ``update_weights=False`` skips the lower step (mask learning only). Float16 weights
    train on float32 copies (:class:`onnxfair.finetune.MasterWeights`); a non-finite loss stops training,
    with the dense weights kept and a warning.

Binarisation (onnxfair.select, the selection every method uses)
    The final scores become a :class:`onnxfair.importance.Scores` (criterion "bilevel"; weights the input
    model already had at zero count as removed, as in the steps' masks) and go through
    :func:`onnxfair.select.select_channels` (structured) or :func:`onnxfair.select.select_weights` (unstructured) with the run's budget, scope and round_to, so
    counts, rounding, Split/Slice parts and ties are exactly the other methods'. The steps' hard masks
    come from the same functions (channels) or from the same ranking without tie rules (weights, a torch
    top-k: exact selection 200 times over 10^5-10^7 weights would dominate the run).
    The global ranking uses s as learned (``normalise=False``): the prior is already divided by each
    layer's mean, as magnitude's global ranking is, and scores are logs, so a second division means nothing.
    ``target_macs`` (structured only): the final selection meets the target on the real cost when ``macs_fn``
    is given; the steps keep the channel count that selection gives under the prior (a real cost per step
    would cost a rewrite each), so training runs at the written size.
    The last step does not move the scores, so the written mask is the one the weights trained under last
    (up to select.py's tie rules); with one step it is magnitude's.
    Afterwards the hard masks are set on the module (consumer-side for channels, the same masks as the graph
    layer's channel_masks), and ``finetune_epochs > 0`` runs a short fine-tune with them
    (:func:`onnxfair.finetune.finetune`). The module's weights are left as trained; write them back with
    ``mod.to_onnx`` before the rewrite to keep the lower level's update.
"""

from __future__ import annotations

import math
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
    adam,
    batch_losses,
    finetune,
    group_means,
    model_device,
    predict_probs,
    untrainable_names,
    validation_stats,
    module_model,
)
from onnxfair.graph.groups import ChannelGroup
from onnxfair.importance.scores import Scores, compute_scores
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
    steps_run: int = 0  # joint steps taken (fewer than asked when training diverged)
    val: dict | None = None  # val accuracy and per-group accuracy of the binarised model (before fine-tune)
    finetune: FinetuneResult | None = None

    @property
    def selection(self) -> dict:
        """What the rewrite takes: keep-sets (structured) or 0/1 masks (unstructured)."""
        return self.keep if self.structured else self.masks


class _ChannelMasker:
    """Spreads per-channel values of every group onto the parameters they mask (consumer side).

    ``masks`` multiplies the factors of all groups touching a parameter; ``gather`` sums back per channel.
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

    def masks(self, per_group: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for gi, name, axis, pos, chan in self.entries:
            shape = self.shapes[name]
            vals = per_group[gi]
            vec = torch.ones(shape[axis], dtype=vals.dtype, device=vals.device).index_put((pos,), vals[chan])
            view = [1] * len(shape)
            view[axis] = shape[axis]
            factor = vec.reshape(view)
            out[name] = factor if name not in out else out[name] * factor
        return {n: m.expand(self.shapes[n]) for n, m in out.items()}

    def gather(self, per_param: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The reverse of `masks`: per channel of every group, the sum of a per-parameter tensor over the
        positions that channel's mask covers (the straight-through gradient of a channel mask)."""
        out = [torch.zeros(g.size, dtype=torch.float64, device=self.device) for g in self.groups]
        for gi, name, axis, pos, chan in self.entries:
            t = per_param.get(name)
            if t is None:
                continue
            along = t.movedim(axis, 0).reshape(t.shape[axis], -1).sum(1).to(torch.float64)
            out[gi].index_add_(0, chan, along[pos])
        return out


def _spread(jg: torch.Tensor, present: torch.Tensor, kind: str) -> torch.Tensor:
    vals = jg[present]
    if vals.numel() < 2:
        return jg.sum() * 0.0
    if kind == "variance":
        return ((vals - vals.mean()) ** 2).mean()
    return vals.max() - vals.min()


def learned_scores(units: Sequence[ChannelGroup] | Sequence[str], final: Mapping,
                   alive: Mapping[str, np.ndarray] | None = None) -> Scores:
    """The learned mask scores as the selection's input: channel scores per group id (structured) or weight
    scores per initializer (unstructured). Every channel is alive (bi-level starts from the dense model);
    `alive` (unstructured) marks the weights the input model already had at zero, which stay removed."""
    structured = bool(units) and isinstance(units[0], ChannelGroup)
    if structured:
        channels = {g.id: np.asarray(final[g.id], np.float64) for g in units}
        return Scores(criterion="bilevel", structured=True, weights={}, weight_alive={}, channels=channels,
                      channel_alive={gid: np.ones(sc.shape, bool) for gid, sc in channels.items()})
    weights = {n: np.asarray(final[n], np.float64) for n in units}
    return Scores(criterion="bilevel", structured=False, weights=weights,
                  weight_alive={n: np.ones(sc.shape, bool) if alive is None or n not in alive
                                else np.asarray(alive[n], bool) for n, sc in weights.items()})


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


def magnitude_prior(magnitude: Scores, units: Sequence[ChannelGroup] | Sequence[str]) -> list[torch.Tensor]:
    """Initial scores: log of the magnitude score over its layer's mean (over the units still alive, as
    select.py normalises), so that the first step's hard mask is magnitude's at the same budget and scope.
    Units scoring 0 start 50 below the smallest other score: after every real unit, never tied with one."""
    ratios = []
    for u in units:
        if isinstance(u, ChannelGroup):
            sc = np.asarray(magnitude.channels[u.id], np.float64)
            alive = magnitude.channel_alive.get(u.id)
        else:
            sc = np.asarray(magnitude.weights[u], np.float64)
            alive = magnitude.weight_alive.get(u)
        live = sc[np.asarray(alive, bool)] if alive is not None else sc
        mean = float(live.mean()) if live.size else 0.0
        ratios.append(sc / mean if mean > 0 else sc)
    positive = [r[r > 0].min() for r in ratios if (r > 0).any()]
    floor = float(np.log(min(positive))) - 50.0 if positive else 0.0
    return [torch.from_numpy(np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), floor)) for r in ratios]


def _topk_weight_masks(scores: Sequence[torch.Tensor], sparsity: float, scope: str,
                       alive: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
    """A step's hard weight masks: the ranking select_weights uses, without its tie rules (a torch top-k).
    `alive` (per layer, bool) marks the weights still there: the others are never kept, as in select_weights,
    so the steps train under the mask the run can write."""
    if alive is not None:
        scores = [s.masked_fill(~torch.from_numpy(np.asarray(a, bool)).reshape(s.shape), -math.inf)
                  for s, a in zip(scores, alive)]
    n_alive = [int(torch.isfinite(s).sum()) if alive is not None else s.numel() for s in scores]

    def keep_count(n: int, live: int) -> int:
        return min(n - int(round(sparsity * n)), live)

    if scope == "layer":
        out = []
        for s, live in zip(scores, n_alive):
            m = torch.zeros(s.numel(), dtype=torch.float32)
            k = keep_count(s.numel(), live)
            if k > 0:
                m[torch.topk(s.reshape(-1), k, sorted=False).indices] = 1.0
            out.append(m.reshape(s.shape))
        return out
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.float32)
    k = keep_count(flat.numel(), sum(n_alive))
    if k > 0:  # exactly k, ties included: a threshold would keep every unit tied at the cut
        keep[torch.topk(flat, k, sorted=False).indices] = 1.0
    return [m.reshape(s.shape) for m, s in zip(torch.split(keep, [s.numel() for s in scores]), scores)]


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
    penalty: str = "variance",
    loss: str = "ce",
    beta: float = 0.75,
    gamma: float = 5.0,
    score_lr: float = 0.01,
    weight_lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    update_weights: bool = True,
    prior: Scores | None = None,
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
    `macs_fn` and `dense_macs` as in :func:`onnxfair.select.select_channels`). `prior` is the magnitude
    criterion's Scores for these units (computed here when None). `fixed_weights` (initializers --ignore
    keeps untouched) are never trained.
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
    if target_macs is not None:
        macs_keep_fraction(units, target_macs, dense_macs)  # refuses a target the fixed layers alone exceed
    if not structured:
        for n in units:
            if n not in mod.params:
                raise UsageError(f"{n!r} is not a float initializer of the model")
    say = progress or (lambda s: None)
    device = model_device(mod)
    n_groups = len(train.group_labels)
    budget = {"sparsity": sparsity} if sparsity is not None else {"target_macs": target_macs}

    # dense references, taken before any mask or weight change
    mod.set_masks(None)
    if dense_probs is None and (loss == "pw" or (finetune_epochs > 0 and finetune_loss in DENSE_REFERENCE_LOSSES)):
        dense_probs = predict_probs(mod, train)
    dense_val_probs = None
    if finetune_epochs > 0 and finetune_loss == "ceag" and val is not None and len(val):
        dense_val_probs = predict_probs(mod, val)
    if prior is None:
        prior = compute_scores("magnitude", mod, groups=units if structured else None,
                               weights=None if structured else units)
    scores = magnitude_prior(prior, units)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    masker = _ChannelMasker(mod, units) if structured else None
    params = mod.params

    def learned(step_scores: list[torch.Tensor]) -> Scores:
        return learned_scores(units, {(u.id if structured else u): sc.numpy() for u, sc in zip(units, step_scores)},
                              None if structured else prior.weight_alive)

    step_budget = budget
    if target_macs is not None and macs_fn is not None:
        # the steps select by channel count: the real cost of every step's mask would cost a rewrite each. The
        # count is the one the real target keeps under the prior, so training runs at the written size
        real = select_channels(learned(scores), units, scope=scope, round_to=round_to, normalise=False,
                               macs_fn=macs_fn, dense_macs=dense_macs, target_macs=target_macs)
        kept, total = sum(len(v) for v in real.values()), sum(g.size for g in units)
        if 0 < kept < total:
            step_budget = {"sparsity": 1.0 - kept / total}

    def hard_masks(step_scores: list[torch.Tensor], final: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
        """The selection of these scores ({group id: kept} or {name: 0/1 array}) and its parameter masks."""
        if structured:
            keep = select_channels(learned(step_scores), units, scope=scope, round_to=round_to, normalise=False,
                                   macs_fn=macs_fn if final else None, dense_macs=dense_macs,
                                   **(budget if final else step_budget))
            per_group = []
            for g in units:
                v = torch.zeros(g.size, device=device)
                v[torch.as_tensor(keep[g.id], dtype=torch.long, device=device)] = 1.0
                per_group.append(v)
            return keep, {n: m.contiguous() for n, m in masker.masks(per_group).items()}
        if final:
            chosen = select_weights(learned(step_scores), sparsity, scope=scope, normalise=False)
        else:
            chosen = {n: m.numpy() for n, m in zip(units, _topk_weight_masks(step_scores, sparsity, scope,
                                                                             [prior.weight_alive[n] for n in units]))}
        return chosen, {n: torch.as_tensor(m, dtype=torch.float32, device=device) for n, m in chosen.items()}

    _, first_masks = hard_masks(scores)
    masked_names = list(first_masks)
    frozen = untrainable_names(model if model is not None else module_model(mod))
    wnames = [n for n, p in params.items() if n not in frozen and n not in fixed_weights and p.is_floating_point()]
    # the stored (unmasked) values of masked parameters, float32 at least (float16 sums and steps lose
    # too much); the module's own hold the masked values each step
    stored = {n: params[n].detach().to(torch.promote_types(params[n].dtype, torch.float32)).clone()
              for n in masked_names}
    trained = [stored[n] for n in masked_names if n in wnames] + [params[n] for n in wnames if n not in stored]
    w_opt = adam(trained, weight_lr) if update_weights and trained else None
    dense_values = {n: p.detach().clone() for n, p in params.items() if n in wnames and n not in stored}
    initial = {n: t.clone() for n, t in stored.items()}
    saved_flags = {n: p.requires_grad for n, p in params.items()}

    def zero_param_grads() -> None:
        for p in params.values():
            p.grad = None

    order = np.zeros(0, np.int64)
    pos = 0
    log_every = max(1, steps // 10)
    history: list[dict] = []
    steps_run = 0  # fewer than `steps` when training diverged
    step_masks = first_masks
    try:
        for p in params.values():
            p.requires_grad_(True)  # the straight-through gradient needs g at every masked parameter
        for step in range(steps):
            if pos + batch_size > len(order):  # a seeded reshuffle for each pass over the data
                order, pos = rng.permutation(len(train)), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            if step:
                step_masks = hard_masks(scores)[1]
            with torch.no_grad():
                for n in masked_names:
                    params[n].copy_(stored[n] * step_masks[n])
            zero_param_grads()
            per_row, _logits, g = batch_losses(mod, train, idx, device, loss, dense_probs, beta, gamma)
            jg, counts = group_means(per_row, g, n_groups)
            j, pen = per_row.mean(), _spread(jg, counts > 0, penalty)
            if not bool(torch.isfinite(j + alpha * pen)):  # diverged weights cannot be written: keep the dense ones
                with torch.no_grad():
                    for n, t in initial.items():
                        stored[n].copy_(t)
                    for n, t in dense_values.items():
                        params[n].copy_(t)
                say(f"warning: bilevel training diverged at step {step} (non-finite loss); the weights stay the "
                    "dense model's and the scores are those learned before it")
                break
            steps_run = step + 1
            (j + alpha * pen).backward()
            with torch.no_grad():
                gw = {n: params[n].grad.double() * stored[n].double() for n in masked_names
                      if params[n].grad is not None}
                unit_grads = masker.gather(gw) if structured else [gw[n].double() if n in gw else None for n in units]
                for sc, ug in zip(scores, unit_grads):
                    rms = float(ug.pow(2).mean().sqrt()) if ug is not None else 0.0
                    if rms > 0 and step < steps - 1:  # the last step's mask is the one written
                        sc -= score_lr * ug.cpu() / rms
                if w_opt is not None:
                    removed = {}
                    for n in masked_names:
                        if n in wnames:
                            gr = params[n].grad
                            stored[n].grad = None if gr is None else (gr * step_masks[n]).to(stored[n].dtype)
                            removed[n] = (step_masks[n] == 0, stored[n][step_masks[n] == 0].clone())
                    w_opt.step()
                    for n, (where, values) in removed.items():  # Adam's momentum would move removed weights
                        stored[n][where] = values
            if step % log_every == 0 or step == steps - 1:
                moved = _moved_fraction(first_masks, step_masks)
                rec = {"step": step, "loss": float(j.detach()), "penalty": float(pen.detach()), "moved": moved}
                history.append(rec)
                say(f"bilevel step {step}: loss {rec['loss']:.4f}, penalty {rec['penalty']:.4f}, "
                    f"{moved:.4f} of the mask moved from magnitude's")
    finally:
        zero_param_grads()
        with torch.no_grad():
            for n in masked_names:
                params[n].copy_(stored[n].detach())
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])

    final_scores = [sc.numpy().astype(np.float64) for sc in scores]
    score_map = {(g.id if structured else g): sc for g, sc in zip(units, final_scores)}
    chosen, final_masks = hard_masks(scores, final=True)
    res = BilevelResult(structured=structured, scores=score_map, history=history, steps_run=steps_run,
                        **({"keep": chosen} if structured else {"masks": chosen}))
    mod.set_masks(final_masks)
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
            mod, train, val, masks=final_masks, epochs=finetune_epochs, loss=finetune_loss, lr=finetune_lr,
            batch_size=batch_size, seed=seed, dense_probs=dense_probs, dense_val_probs=dense_val_probs,
            model=model, progress=progress, beta=beta, gamma=gamma, trainable=wnames,
        )
    return res


def _moved_fraction(first: Mapping[str, torch.Tensor], now: Mapping[str, torch.Tensor]) -> float:
    """Share of mask positions that differ from the first step's (magnitude's) mask."""
    diff = sum(int((first[n] != now[n]).sum()) for n in first)
    return diff / max(1, sum(m.numel() for m in first.values()))
