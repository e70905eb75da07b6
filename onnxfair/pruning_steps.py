"""The torch-side steps of a prune run: score and select masks (one-shot or iterative, or bi-level), fine-tune.

Split from prune.py so that module reads as the data flow while this one holds the method dispatch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import numpy as np
import onnx
import torch

from onnxfair.data import GroupedDataset
from onnxfair.errors import ModelError
from onnxfair.interpret.device import torch_device


def build_module(model: onnx.ModelProto, device: str):
    """The interpreter of `model`'s logits (`head.logit_view`) on the torch device matching --device."""
    from onnxfair.head import logit_view
    from onnxfair.interpret import OnnxModule

    return OnnxModule(logit_view(model)).to(torch_device(device))


def check_gradients(model: onnx.ModelProto, ds: GroupedDataset, device: str, batch_size: int) -> None:
    """Backpropagate a batch of `ds` (three rows, fewer with a smaller --batch-size) through the interpreter of
    `model`: what stops every gradient run (an ArgMax head, a graph whose shapes pin the batch size, an op
    torch cannot differentiate) is refused here in one line, before a sweep's first run rather than in the
    middle of its grid."""
    from onnxfair.finetune import batch_losses
    from onnxfair.interpret.module import one_line

    mod = build_module(model, device)
    for p in mod.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    with torch.enable_grad():
        per_row, _logits, _g = batch_losses(mod, ds, np.arange(min(3, batch_size, len(ds))), torch_device(device))
        try:
            per_row.sum().backward()
        except RuntimeError as exc:
            raise ModelError(f"the interpreter cannot backpropagate through the model ({one_line(exc)}); "
                             "prune it with --method magnitude and no fine-tuning, which need no gradients") from None


def _keep_fraction_schedule(cfg) -> list[dict[str, float]]:
    """Budgets per step: sparsity after step t is min(1 - keep^t, target); a MACs target is reached geometrically."""
    from onnxfair.select import sparsity_schedule

    if cfg.sparsity is not None:
        return [{"sparsity": s} for s in sparsity_schedule(cfg.sparsity, cfg.iterations)]
    steps = [cfg.target_macs ** (t / cfg.iterations) for t in range(1, cfg.iterations + 1)]
    steps[-1] = cfg.target_macs
    return [{"target_macs": m} for m in steps]


def _to_torch_masks(masks: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in masks.items()}


def select_masks(
    dense: onnx.ModelProto, an: Any, units: list, fit: GroupedDataset | None, cfg: Any, progress: Callable[[str], None],
    timer: Callable[[str], ContextManager] | None = None,
) -> tuple[dict[int, np.ndarray] | None, dict[str, np.ndarray], Any, dict]:
    """Keep-sets (structured) and element masks for the chosen method; returns the interpreter too (its
    weights repaired after each step with --repair, trained between steps with --step-epochs) and the
    report's records of those updates (`step_finetune`, `repair`). `timer(phase)`, when given, times them
    as the phases "repair" and "step-finetune".

    Structured masks are consumer-side channel masks (what the interpreter must apply to equal the
    physically pruned graph); unstructured masks are per-weight.
    """
    from onnxfair.graph import channel_masks
    from onnxfair.importance import compute_scores, dense_probabilities
    from onnxfair.prune import weight_names
    from onnxfair.select import rewrite_macs, select_channels, select_weights

    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = str(torch_device(cfg.device))
    mod = build_module(dense, cfg.device)
    records: dict = {}
    dense_stats: dict = {}  # the repair's targets, measured once per run

    def phase(name: str):
        return timer(name) if timer is not None else contextlib.nullcontext()

    def repair(masks: dict[str, np.ndarray]) -> None:
        # the paper's models keep BatchNorm, which retraining re-normalises after every step; folded into the
        # exported convolutions it cannot, so each step's masks are repaired before anything is rescored
        if cfg.repair != "none":
            with phase("repair"):
                record = repair_masked(dense, mod, masks, fit, cfg, progress, dense_stats)
            records["repair"] = {**record, "steps": records.get("repair", {}).get("steps", 0) + 1}

    if cfg.method == "bilevel":
        keep, masks, mod, records["bilevel"] = _bilevel(dense, an, units, fit, cfg, mod, progress)
        repair(masks)
        mod.set_masks(None)
        return keep, masks, mod, records

    dense_probs = dense_probabilities(mod, fit) if (cfg.loss == "pw" and fit is not None) else None
    weights = weight_names(dense)
    keep: dict[int, np.ndarray] | None = None
    masks: dict[str, np.ndarray] = {}
    schedule = _keep_fraction_schedule(cfg)
    for step, budget in enumerate(schedule, 1):
        if len(schedule) > 1:
            progress(f"  step {step}/{len(schedule)}: " + ", ".join(f"{k} {v:.3f}" for k, v in budget.items()))
        scores = compute_scores(
            cfg.method, mod, fit if cfg.method != "magnitude" else None,
            groups=an.groups if cfg.structured else None,
            weights=weights if cfg.structured else units,
            masks=_to_torch_masks(masks, device) if masks else None,
            loss=cfg.loss, beta=cfg.beta, gamma=cfg.gamma, dense_probs=dense_probs,
            batch_size=cfg.batch_size, device=device, damping=cfg.damping,
        )
        if cfg.structured:
            selection = dict(
                scope=cfg.scope, round_to=cfg.round_to, keep_prev=keep,
                macs_fn=rewrite_macs(an) if "target_macs" in budget else None,
                dense_macs=float(an.cost.macs) if getattr(an, "cost", None) is not None else None,
            )
            floors = None
            if "target_macs" in budget and step < len(schedule):
                # masks are nested, so a step must not remove what the final budget would keep under today's
                # scores: a MACs budget's best counts are not monotone in the budget (a wide layer's channels
                # go first near the end), and without floors the last step lands well under its target
                final = select_channels(scores, an.groups, target_macs=cfg.target_macs, **selection)
                floors = {gid: len(kept) for gid, kept in final.items()}
            keep = select_channels(scores, an.groups, floors=floors, **selection, **budget)
            masks = channel_masks(an, keep)
        else:
            new = select_weights(scores, budget["sparsity"], scope=cfg.scope, threads=cfg.threads or torch.get_num_threads())
            masks = {k: (v * masks[k] if k in masks else v) for k, v in new.items()}
        repair(masks)
        if cfg.step_epochs and step < len(schedule):  # the FairGRAPE paper's cycle: retrain before rescoring
            progress(f"  step {step}/{len(schedule)}: fine-tuning {cfg.step_epochs} epochs")
            with phase("step-finetune"):
                record = finetune_masked(dense, mod, masks, fit, cfg, cfg.step_epochs, progress)
            records.setdefault("step_finetune", []).append({"step": step, **record})
    mod.set_masks(None)
    return keep, masks, mod, records


def _bilevel(dense, an, units, fit, cfg, mod, progress):
    """Bi-level method: mask scores and weights trained jointly, then selected to the budget by select.py.
    Returns the selection, the module and the record for the report (logged steps, the binarised model's
    accuracy on the held-out fifth of --data)."""
    from onnxfair.bilevel import bilevel_prune
    from onnxfair.graph import channel_masks
    from onnxfair.importance import compute_scores
    from onnxfair.prune import weight_names
    from onnxfair.select import rewrite_macs

    if cfg.sparsity is not None:
        budget = {"sparsity": cfg.sparsity}
    else:
        budget = {"target_macs": cfg.target_macs, "macs_fn": rewrite_macs(an),
                  "dense_macs": float(an.cost.macs) if getattr(an, "cost", None) is not None else None}
    train, val = fit.split(0.2, seed=cfg.seed)
    prior = compute_scores("magnitude", mod, groups=an.groups if cfg.structured else None,
                           weights=weight_names(dense) if cfg.structured else units)
    res = bilevel_prune(
        mod, units, train, val, prior=prior, steps=cfg.bilevel_steps, scope=cfg.scope,
        round_to=cfg.round_to if cfg.structured else 1, alpha=cfg.bilevel_alpha, loss=cfg.loss,
        beta=cfg.beta, gamma=cfg.gamma,
        batch_size=cfg.batch_size, seed=cfg.seed, model=dense,
        progress=progress, fixed_weights=ignored_weights(dense, cfg), **budget,
    )
    record = {"steps": res.steps_run, "alpha": cfg.bilevel_alpha, "log": res.history, "val": res.val}
    if cfg.structured:
        return res.keep, channel_masks(an, res.keep), mod, record
    return None, res.masks, mod, record


def ignored_weights(dense: onnx.ModelProto, cfg: Any) -> set[str]:
    """Initializers --ignore keeps untouched: never pruned (the selection's job), and never trained either."""
    from onnxfair.prune import ignored_initializers

    return ignored_initializers(dense, cfg.ignore) if cfg.ignore else set()


def finetune_and_write_back(
    dense: onnx.ModelProto, mod: Any, masks: dict[str, np.ndarray], fit: GroupedDataset, cfg: Any,
    progress: Callable[[str], None],
) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune the masked interpreter on part of --data (early stopping on the rest) and write weights back."""
    res = finetune_masked(dense, mod, masks, fit, cfg, cfg.finetune_epochs, progress)
    return mod.to_onnx(dense), res


def repair_masked(
    dense: onnx.ModelProto, mod: Any, masks: dict[str, np.ndarray], fit: GroupedDataset, cfg: Any,
    progress: Callable[[str], None], dense_stats: dict | None = None,
) -> dict:
    """--repair: renormalise the pruned layers' output channels to the dense model's statistics on --data
    (group-balanced unless --repair plain), in place; leaves the masks set. Returns the report's record.
    `dense_stats` carries the dense model's statistics from one step to the next."""
    from onnxfair.repair import repair_statistics

    mod.set_masks(_to_torch_masks(masks, str(torch_device(cfg.device))))
    return repair_statistics(mod, dense, masks, fit, balanced=cfg.repair == "balanced",
                             batch_size=cfg.batch_size, progress=progress, dense_stats=dense_stats,
                             fixed=ignored_weights(dense, cfg))


def finetune_masked(
    dense: onnx.ModelProto, mod: Any, masks: dict[str, np.ndarray], fit: GroupedDataset, cfg: Any, epochs: int,
    progress: Callable[[str], None],
) -> dict:
    """Fine-tune `mod` in place under `masks` for up to `epochs` (--finetune-loss; early stopping with
    --patience on a fifth of --data) and leave the masks set; returns the run's record for the report."""
    from onnxfair.finetune import DENSE_REFERENCE_LOSSES, finetune, predict_probs

    train, val = fit.split(0.2, seed=cfg.seed)
    device = str(torch_device(cfg.device))
    fixed = ignored_weights(dense, cfg)
    reference = {}
    if cfg.finetune_loss in DENSE_REFERENCE_LOSSES:
        # the dense model's predictions, from the untouched graph: `mod` may hold bi-level-trained weights
        dense_mod = build_module(dense, cfg.device)
        reference = {"dense_probs": predict_probs(dense_mod, train), "dense_val_probs": predict_probs(dense_mod, val)}
    res = finetune(
        mod, train, val, masks=_to_torch_masks(masks, device), epochs=epochs, loss=cfg.finetune_loss,
        lr=cfg.finetune_lr, batch_size=cfg.batch_size, seed=cfg.seed,
        eps=cfg.finetune_eps if cfg.finetune_loss == "ceag" else None, patience=cfg.finetune_patience or None,
        beta=cfg.beta, gamma=cfg.gamma, model=dense, progress=progress, **reference,
        trainable=[n for n in mod.params if n not in fixed],
    )
    mod.set_masks(_to_torch_masks(masks, device))
    return res.to_dict()
