"""Weight update after pruning: fine-tune the interpreter's parameters with the pruning masks held fixed.

Losses
------
- ``ce``, ``pw``: per-row losses from :mod:`onnxfair.losses` (``pw`` needs the dense model's probabilities).
- ``balanced`` (group reweighting, as in Kamiran & Calders 2012 and group-balanced ERM): the mean over the
  groups present in the batch of each group's mean cross-entropy, so every group weighs the same however
  few rows it has. No multipliers, so nothing to tune and nothing to oscillate; a minority's rows are seen
  as often as before, each with more weight (with a small minority, watch for it being over-fit).
- ``distill`` (knowledge distillation from the dense model, Hinton et al. 2015, with the group weighting of
  ``balanced``): the per-row loss is KL(p_dense ‖ p_pruned) over the classes at temperature 1, and the
  objective is the mean over the groups in the batch of each group's mean KL. The degradation the report
  measures is relative to the dense model, so the dense model's outputs are the target: a row carries C
  numbers instead of one label (more signal from a small minority), and the dense model's own mistakes are
  not degradation, so they are not trained away either. Labels are not used by the loss, only by early
  stopping, which keeps the epoch with the best mean group accuracy, as ``balanced`` does.
- ``equalized`` (Tran et al., NeurIPS 2022): minimise J subject to J_g − J = 0 for every group g, where J is
  the mean loss over the batch and J_g the mean loss over the batch rows of group g. Lagrangian with
  non-negative multipliers on the absolute constraint violation:

      primal:  min_θ  J + Σ_g λ_g · |J_g − J|            (groups absent from the batch contribute 0)
      dual:    λ_g ← λ_g + η · |J_g − J|                  (after each batch, on the detached batch values)

  so λ ≥ 0 and only ever grows while a gap remains.
- ``ceag`` (Hashemizadeh et al., ICLR 2024, "Balancing Act"): constraint ψ_g ≤ ε per group, with the excess
  accuracy gap ψ_g = (Acc_g(dense) − Acc_g(θ)) − (Acc(dense) − Acc(θ)). Accuracy has no gradient, so the
  primal step uses the loss surrogate of the paper's reference implementation,
  ψ̃_g = (J_g(θ) − J_g(dense)) − (J(θ) − J(dense)); the dense terms are constants, so

      primal:  min_θ  J + Σ_g λ_g · (J_g − J)           (groups absent from the batch contribute 0)
      dual:    λ_g ← max(0, λ_g + η · (ψ_g − ε))          (ψ_g MEASURED, from the replay buffer)

  ψ_g is measured on a per-group replay buffer of the current model's most recent correctness flags on the
  training rows (the last ``buffer_size`` rows of each group; a group whose buffer holds
  min(buffer_size, its training rows) flags is "ready"). Acc(θ) is the mean of the ready groups' buffer
  accuracies weighted by the groups' training-set shares, and Acc(dense) uses the same weights over the
  same groups, so both sides of the gap describe one population. Only ready groups take a dual step.
  Acc_g(dense) comes from the dense model's predictions on the training rows.

Masks and semantics
-------------------
The masks are set on the module (``mod.set_masks``) and, in addition, the parameters are multiplied by
their masks before training and after every optimiser step, and the gradients are zeroed at masked
positions; masked weights are therefore exactly 0 in ``mod.params`` and after ``mod.to_onnx``. The
interpreter has eval-mode semantics only (BatchNorm uses stored statistics), which is what post-training
fine-tuning wants; BatchNormalization mean/variance initializers are never trained.

Optimiser: Adam (default) or SGD with momentum 0.9, no weight decay (decay would move masked zeros only
through the mask, but it also shrinks kept weights the pruning criterion already judged).

Early stopping: the state after each epoch (and the starting state, epoch 0) is scored on ``val``; the best
is restored at the end. ce/pw: highest val accuracy. balanced/distill: highest mean of the val group accuracies
(the objective's own weighting). equalized/ceag: "accuracy subject to the constraint":
an epoch is feasible when its val violation is within tolerance ``eps`` (equalized: max_g |J_g − J| of the
cross-entropy on val ≤ eps, in nats, default 0.05; ceag: max_g ψ_g on val ≤ ε, in accuracy, default 0.02);
among feasible epochs the highest val accuracy wins, and when no epoch is feasible the smallest violation
wins. Ties keep the earlier epoch. Training stops after ``patience`` epochs
without a new best; equalized and ceag count them only once an epoch is feasible (until then the violation
may grow while the multipliers build up), so a run that never meets its constraint runs every epoch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from onnxfair.data import GroupedDataset
from onnxfair.errors import DataError, UsageError

LOSSES = ("ce", "pw", "balanced", "distill", "equalized", "ceag")
DENSE_REFERENCE_LOSSES = ("pw", "distill", "ceag")  # need the dense model's probabilities on the training rows
DEFAULT_CEAG_EPS = 0.02  # accuracy units: ψ_g ≤ 2 points
DEFAULT_EQUALIZED_EPS = 0.05  # loss units (nats): max_g |J_g − J| ≤ 0.05 on val counts as equal


# ----------------------------------------------------------------------------------------------- helpers


def model_device(mod) -> torch.device:
    """The device of the module's parameters (CPU for a module without any)."""
    for p in mod.params.values():
        return p.device
    return torch.device("cpu")


def to_tensors(inputs: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in inputs.items()}


def logits_of(mod, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Class scores [N, C]: the model's first output, read as logits (a single binary logit z -> [0, z])."""
    from onnxfair.interpret.module import checked_output
    from onnxfair.losses import as_class_logits

    return as_class_logits(checked_output(mod, inputs)).float()


def predict_probs(mod, ds: GroupedDataset, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities [N, C] of `mod` on `ds` (float32): the dense reference for pw and ceag."""
    device = model_device(mod)
    chunks = []
    with torch.no_grad():
        for inputs, _, _ in ds.batches(batch_size):
            chunks.append(torch.softmax(logits_of(mod, to_tensors(inputs, device)), dim=1).cpu().numpy())
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)


_WEIGHT_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "LayerNormalization",
                   "InstanceNormalization", "GroupNormalization", "LSTM", "GRU", "RNN"}


def untrainable_names(model) -> set[str]:
    """Initializers weight updates must leave alone: BatchNormalization's running statistics, and the
    constants that define the function rather than fit the data: Pow exponents, Clip bounds, and scalars
    that no weight or normalisation op reads (GELU's sqrt(2) and 0.5, an attention scale). Trained, such a
    constant turns ReLU6 into a leaky ReLU, or a squared term's exponent a NaN gradient."""
    names: set[str] = set()
    if model is None:
        return names
    graph = model.graph
    weights = {x for n in graph.node if n.op_type in _WEIGHT_READERS for x in n.input[:3]} | _fitted_scalars(graph)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "BatchNormalization":
            names.update(node.input[3:5])
        elif node.op_type == "Pow":
            names.update(node.input[1:2])
        elif node.op_type == "Clip":
            names.update(node.input[1:3])
    names.update(i.name for i in graph.initializer if int(np.prod(i.dims)) <= 1 and i.name not in weights)
    return names - {""}


def _fitted_scalars(graph) -> set[str]:
    """Initializers fitted to the data though no weight op reads them: a PRelu's slopes, and the bias a
    separate Add or Sub puts on a Conv, Gemm or MatMul output (a one-logit head's threshold, as tf2onnx
    writes a Dense(1)): a scalar one would otherwise be taken for a constant of the function."""
    inits = {i.name for i in graph.initializer}
    layers = {o for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") for o in n.output}
    fitted = set()
    for n in graph.node:
        if n.op_type == "PRelu" and len(n.input) > 1:
            fitted.add(n.input[1])
        elif n.op_type in ("Add", "Sub") and len(n.input) == 2:
            a, b = n.input
            fitted.update(c for c, other in ((a, b), (b, a)) if c in inits and other in layers)
    return fitted


def module_model(mod):
    for attr in ("model", "model_proto", "proto", "_model"):
        m = getattr(mod, attr, None)
        if m is not None and hasattr(m, "graph"):
            return m
    return None


def prepare_masks(mod, masks: Mapping[str, object] | None) -> dict[str, torch.Tensor]:
    """Masks as float tensors on the module's device, checked against the parameters' names and shapes."""
    if not masks:
        return {}
    out: dict[str, torch.Tensor] = {}
    for name, m in masks.items():
        if name not in mod.params:
            raise UsageError(f"mask for {name!r}, which is not a float initializer of the model; check the mask names")
        p = mod.params[name]
        t = m.detach() if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m))
        t = t.to(device=p.device, dtype=p.dtype)
        if tuple(t.shape) != tuple(p.shape):
            raise UsageError(f"mask for {name!r} has shape {tuple(t.shape)}, the initializer {tuple(p.shape)}")
        out[name] = t
    return out


def apply_masks_to_weights(mod, masks: Mapping[str, torch.Tensor]) -> None:
    """Write exact zeros at masked positions (param ← param · mask)."""
    with torch.no_grad():
        for name, m in masks.items():
            mod.params[name].mul_(m)


def group_means(values: torch.Tensor, group_ids: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean of per-row values (0 where the group is absent) and the per-group row counts."""
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(0, group_ids, values)
    counts = torch.bincount(group_ids, minlength=n_groups).to(values.dtype)
    return sums / counts.clamp(min=1), counts


def batch_losses(mod, ds: GroupedDataset, idx: np.ndarray, device, loss: str = "ce", dense_probs=None,
                 beta: float = 0.75, gamma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss (pw or distill when asked, else ce), logits and group ids of rows `idx`: the step every
    trainer shares."""
    from onnxfair.losses import loss_fn

    inputs = to_tensors({k: v[idx] for k, v in ds.inputs.items()}, device)
    y = torch.from_numpy(ds.y[idx]).to(device)
    g = torch.from_numpy(ds.group_ids[idx]).to(device)
    logits = logits_of(mod, inputs)
    if loss == "pw":
        dp = torch.from_numpy(np.asarray(dense_probs)[idx]).to(device)
        return loss_fn(logits, y, dense_probs=dp, kind="pw", beta=beta, gamma=gamma, reduction="none"), logits, g
    if loss == "distill":
        dp = torch.from_numpy(np.asarray(dense_probs)[idx]).to(device=device, dtype=logits.dtype)
        return distill_loss(logits, dp), logits, g
    return loss_fn(logits, y, kind="ce", reduction="none"), logits, g


def distill_loss(logits: torch.Tensor, dense_probs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(dense_probs ‖ softmax(logits)) in nats (0 where the two distributions agree)."""
    if dense_probs.shape != logits.shape:
        raise UsageError(f"dense_probs has shape {tuple(dense_probs.shape)}, the logits {tuple(logits.shape)}")
    return F.kl_div(F.log_softmax(logits, dim=1), dense_probs, reduction="none").sum(dim=1)


# ------------------------------------------------------------------------------------ ceag replay buffer


class GroupReplayBuffer:
    """Per group, the correctness flags of the most recent `memory` training predictions."""

    def __init__(self, n_groups: int, memory: int, group_sizes: Iterable[int] | None = None):
        if memory < 1:
            raise UsageError(f"replay buffer size {memory} must be at least 1")
        self.memory = memory
        self.buffers: list[deque] = [deque(maxlen=memory) for _ in range(n_groups)]
        sizes = list(group_sizes) if group_sizes is not None else [memory] * n_groups
        # a group with fewer training rows than `memory` is ready once it has shown all of them
        self.needed = [max(1, min(memory, int(s))) for s in sizes]

    def update(self, group_ids: np.ndarray, correct: np.ndarray) -> None:
        for g, c in zip(np.asarray(group_ids).tolist(), np.asarray(correct).astype(bool).tolist()):
            self.buffers[g].append(c)

    def ready(self) -> np.ndarray:
        return np.array([len(b) >= n for b, n in zip(self.buffers, self.needed)], dtype=bool)

    def accuracies(self) -> np.ndarray:
        """Buffer accuracy per group; NaN for an empty buffer."""
        return np.array([np.mean(b) if len(b) else np.nan for b in self.buffers], dtype=np.float64)


def excess_gaps(
    group_acc: np.ndarray, dense_group_acc: np.ndarray, weights: np.ndarray, ready: np.ndarray | None = None
) -> np.ndarray:
    """ψ_g = (Acc_g(dense) − Acc_g) − (Acc(dense) − Acc) over the `ready` groups (NaN elsewhere).

    Acc and Acc(dense) are the `weights`-weighted means over the ready groups (weights renormalised), so
    both overall figures describe the same population.
    """
    group_acc = np.asarray(group_acc, np.float64)
    dense_group_acc = np.asarray(dense_group_acc, np.float64)
    ready = np.ones(group_acc.shape, bool) if ready is None else np.asarray(ready, bool)
    ready = ready & np.isfinite(group_acc) & np.isfinite(dense_group_acc)
    psi = np.full(group_acc.shape, np.nan)
    w = np.where(ready, np.asarray(weights, np.float64), 0.0)
    if not ready.any() or w.sum() <= 0:
        return psi
    w = w / w.sum()
    acc = float((w * np.where(ready, group_acc, 0.0)).sum())
    dense_acc = float((w * np.where(ready, dense_group_acc, 0.0)).sum())
    psi[ready] = (dense_group_acc[ready] - group_acc[ready]) - (dense_acc - acc)
    return psi


def ceag_dual_step(lam: np.ndarray, psi: np.ndarray, eps: float, lr: float) -> np.ndarray:
    """λ_g ← max(0, λ_g + lr · (ψ_g − ε)) where ψ_g is measured (finite); unchanged elsewhere."""
    lam = np.asarray(lam, np.float64).copy()
    ok = np.isfinite(psi)
    lam[ok] = np.maximum(0.0, lam[ok] + lr * (psi[ok] - eps))
    return lam


def equalized_dual_step(lam: np.ndarray, gaps: np.ndarray, present: np.ndarray, lr: float) -> np.ndarray:
    """λ_g ← λ_g + lr · |J_g − J| for the groups present in the batch."""
    lam = np.asarray(lam, np.float64).copy()
    present = np.asarray(present, bool)
    lam[present] += lr * np.abs(np.asarray(gaps, np.float64)[present])
    return lam


# ------------------------------------------------------------------------------------------- the loop


@dataclass
class EpochRecord:
    """Validation figures after one epoch (epoch 0 = the starting, masked state)."""

    epoch: int
    train_loss: float | None
    val_accuracy: float
    val_group_accuracy: dict[str, float]
    val_group_loss: dict[str, float]
    val_violation: float
    feasible: bool
    multipliers: dict[str, float] | None = None


@dataclass
class FinetuneResult:
    loss: str
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    tolerance: float | None = None

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch]

    def constraint_cost(self) -> dict | None:
        """What holding the constraint cost: the most accurate infeasible epoch, when it beats the kept one.

        Early stopping keeps the most accurate feasible epoch, and a model that hurts every group alike
        is feasible (a pruned model near chance often is), so the kept epoch can be far below what
        training reached; the report and progress say so rather than leave it silent."""
        if not self.history or not self.best.feasible:
            return None
        over = [r for r in self.history if not r.feasible and r.val_accuracy > self.best.val_accuracy]
        if not over:
            return None
        top = max(over, key=lambda r: (r.val_accuracy, -r.epoch))
        return {"epoch": top.epoch, "val_accuracy": top.val_accuracy, "val_violation": top.val_violation}

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history) - 1,
            "stopped_early": self.stopped_early,
            "tolerance": self.tolerance,
            "constraint_met": self.best.feasible if self.tolerance is not None and self.history else None,
            "best_infeasible": self.constraint_cost(),
            "history": [asdict(r) for r in self.history],
        }


@dataclass
class ValStats:
    accuracy: float
    group_accuracy: np.ndarray  # NaN for groups absent from val
    group_loss: np.ndarray
    loss: float
    correct: np.ndarray


_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MasterWeights:
    """An optimiser that steps float32 copies of float16/bfloat16 parameters and writes them back.

    In float16 Adam's second moment (0.001·g²) underflows to 0 for |g| below about 8e-3, and its epsilon
    1e-8 is 0 too: steps come out 50x too large, or 0/0 = NaN for a zero gradient. Other parameters are
    stepped in place, as by the plain optimiser."""

    def __init__(self, params: list[torch.Tensor], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = list(params)
        self.masters = [p.detach().float().clone() if p.dtype in _LOW_PRECISION else p for p in self.params]
        self.opt = make(self.masters)

    def zero_grad(self) -> None:
        for t in self.params + self.masters:
            t.grad = None

    def step(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    m.grad = None if p.grad is None else p.grad.float()
            self.opt.step()
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)


def adam(params: list[torch.Tensor], lr: float) -> MasterWeights:
    """Adam for fine-tuning and bilevel's lower level, through float32 copies where parameters are float16."""
    return MasterWeights(params, lambda ps: torch.optim.Adam(ps, lr=lr))


def validation_stats(mod, ds: GroupedDataset, n_groups: int, batch_size: int) -> ValStats:
    """Accuracy and cross-entropy on `ds`, overall and per group: what early stopping and the constraints judge."""
    device = model_device(mod)
    losses, correct = [], []
    with torch.no_grad():
        for inputs, y, _ in ds.batches(batch_size):
            logits = logits_of(mod, to_tensors(inputs, device))
            yt = torch.from_numpy(y).to(device)
            losses.append(F.cross_entropy(logits, yt, reduction="none").cpu().numpy())
            correct.append((logits.argmax(1) == yt).cpu().numpy())
    loss = np.concatenate(losses).astype(np.float64)
    corr = np.concatenate(correct)
    gacc = _group_accuracy(corr, ds.group_ids, n_groups)
    gloss = _group_mean(loss, ds.group_ids, n_groups)
    return ValStats(float(corr.mean()), gacc, gloss, float(loss.mean()), corr)


def _group_mean(values: np.ndarray, group_ids: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of per-row values per group; NaN for a group without rows."""
    counts = np.bincount(group_ids, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(group_ids, weights=np.asarray(values, np.float64), minlength=n_groups) / counts


def _group_accuracy(correct: np.ndarray, group_ids: np.ndarray, n_groups: int) -> np.ndarray:
    """Accuracy per group from per-row correctness flags; NaN for a group without rows."""
    return _group_mean(np.asarray(correct).astype(np.float64), group_ids, n_groups)


def _labelled(values: np.ndarray, labels: list[str]) -> dict[str, float]:
    return {lab: float(v) for lab, v in zip(labels, values) if np.isfinite(v)}


def finetune(
    mod,
    train: GroupedDataset,
    val: GroupedDataset,
    masks: Mapping[str, object] | None = None,
    epochs: int = 5,
    loss: str = "ce",
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    dense_probs: np.ndarray | None = None,
    dense_val_probs: np.ndarray | None = None,
    eps: float | None = None,
    dual_lr: float = 0.05,
    patience: int | None = None,
    progress: Callable[[str], None] | None = None,
    beta: float = 0.75,
    gamma: float = 5.0,
    buffer_size: int = 256,
    optimizer: str = "adam",
    trainable: Iterable[str] | None = None,
    model=None,
) -> FinetuneResult:
    """Fine-tune `mod.params` in place under fixed `masks`; restore the best epoch on `val`.

    `mod` should be the interpreter of the *dense* model with `masks` given here: where `dense_probs`
    (train rows, for pw/ceag) or `dense_val_probs` (val rows, for ceag) are None they are computed from
    `mod` before the masks are applied. With `masks=None` the module's current masks are left as they are
    and no zeros are enforced. `trainable` limits the trained initializers (default: every float
    initializer except BatchNormalization statistics, which are found in `model`, the ONNX model `mod` was
    built from; pass it whenever the graph has BatchNormalization). See the module docstring for the losses
    and the early-stopping rule.
    """
    if loss not in LOSSES:
        raise UsageError(f"unknown fine-tune loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if epochs < 0:
        raise UsageError(f"fine-tune epochs {epochs} must be non-negative")
    if len(train) == 0 or len(val) == 0:
        raise DataError("fine-tuning needs non-empty train and validation parts")
    if optimizer not in ("adam", "sgd"):
        raise UsageError(f"unknown optimizer {optimizer!r}; use adam or sgd")
    say = progress or (lambda s: None)
    labels = list(train.group_labels)
    n_groups = len(labels)
    device = model_device(mod)
    mask_t = prepare_masks(mod, masks)

    # dense references, computed before the masks take effect
    need_dense_train = loss in DENSE_REFERENCE_LOSSES and dense_probs is None
    need_dense_val = loss == "ceag" and dense_val_probs is None
    if need_dense_train or need_dense_val:
        if masks is not None:
            mod.set_masks(None)
        if need_dense_train:
            dense_probs = predict_probs(mod, train)
        if need_dense_val:
            dense_val_probs = predict_probs(mod, val)
    if masks is not None:
        mod.set_masks(mask_t or None)
        apply_masks_to_weights(mod, mask_t)
    if dense_probs is not None and len(dense_probs) != len(train):
        raise UsageError(f"dense_probs has {len(dense_probs)} rows, the training part {len(train)}")
    if dense_val_probs is not None and len(dense_val_probs) != len(val):
        raise UsageError(f"dense_val_probs has {len(dense_val_probs)} rows, the validation part {len(val)}")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frozen = untrainable_names(model if model is not None else module_model(mod))
    names = [n for n in (trainable if trainable is not None else mod.params) if n not in frozen]
    for n in names:
        if n not in mod.params:
            raise UsageError(f"trainable initializer {n!r} is not a float initializer of the model")
    saved_flags = {n: p.requires_grad for n, p in mod.params.items()}
    for n, p in mod.params.items():
        p.requires_grad_(n in names and p.is_floating_point())
    params = [mod.params[n] for n in names if mod.params[n].is_floating_point()]
    if optimizer == "adam":
        opt = adam(params, lr)
    else:
        opt = MasterWeights(params, lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9))

    # constraint references
    train_counts = np.bincount(train.group_ids, minlength=n_groups)
    shares = train_counts / max(train_counts.sum(), 1)
    lam = np.zeros(n_groups, np.float64)
    buffer = None
    eps_c = DEFAULT_CEAG_EPS if eps is None else float(eps)
    dense_group_acc = dense_val_group_acc = None
    if loss == "ceag":
        dense_correct = np.asarray(dense_probs).argmax(1) == train.y
        dense_group_acc = _group_accuracy(dense_correct, train.group_ids, n_groups)
        dense_val_correct = np.asarray(dense_val_probs).argmax(1) == val.y
        dense_val_group_acc = _group_accuracy(dense_val_correct, val.group_ids, n_groups)
        buffer = GroupReplayBuffer(n_groups, buffer_size, train_counts)
    val_counts = np.bincount(val.group_ids, minlength=n_groups)
    val_shares = val_counts / max(val_counts.sum(), 1)

    def violation(stats: ValStats) -> float:
        if loss == "equalized":
            gaps = np.abs(stats.group_loss - stats.loss)
            return float(np.nanmax(gaps)) if np.isfinite(gaps).any() else 0.0
        if loss == "ceag":
            psi = excess_gaps(stats.group_accuracy, dense_val_group_acc, val_shares, val_counts > 0)
            return float(np.nanmax(psi)) if np.isfinite(psi).any() else 0.0
        return 0.0

    result = FinetuneResult(loss=loss)
    if loss == "equalized":
        result.tolerance = DEFAULT_EQUALIZED_EPS if eps is None else float(eps)
    elif loss == "ceag":
        result.tolerance = eps_c

    diverged: list[int] = []

    def record(epoch: int, train_loss: float | None) -> tuple:
        stats = validation_stats(mod, val, n_groups, max(batch_size, 256))
        v = violation(stats)
        finite = bool(np.isfinite(stats.loss)) and (train_loss is None or bool(np.isfinite(train_loss)))
        feasible = finite and (loss not in ("equalized", "ceag") or v <= result.tolerance + 1e-12)
        if not finite:
            diverged.append(epoch)
        rec = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            val_accuracy=stats.accuracy,
            val_group_accuracy=_labelled(stats.group_accuracy, labels),
            val_group_loss=_labelled(stats.group_loss, labels),
            val_violation=v,
            feasible=bool(feasible),
            multipliers={lab: float(x) for lab, x in zip(labels, lam)} if loss in ("equalized", "ceag") else None,
        )
        result.history.append(rec)
        group_balanced = loss in ("balanced", "distill")
        score = float(np.nanmean(stats.group_accuracy)) if group_balanced else stats.accuracy
        key = (-1, 0.0) if not finite else (1, score) if feasible else (0, -v)  # a NaN model is never kept
        say(
            f"fine-tune epoch {epoch}: "
            + (f"train loss {train_loss:.4f}, " if train_loss is not None else "")
            + f"val accuracy {stats.accuracy:.4f}"
            + (f", mean group accuracy {score:.4f}" if group_balanced else "")
            + (f", violation {v:.4f}" if loss in ("equalized", "ceag") and finite else "")
            + ("" if finite else " (non-finite: never kept)")
        )
        return key

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in mod.params.items()}

    best_key = record(0, None)
    first_key, later_keys = best_key, []
    best_state = snapshot()
    try:
        for epoch in range(1, epochs + 1):
            perm = rng.permutation(len(train))
            total, rows = 0.0, 0
            for start in range(0, len(train), batch_size):
                idx = perm[start : start + batch_size]
                per_row, logits, g = batch_losses(mod, train, idx, device, loss, dense_probs, beta, gamma)
                j = per_row.mean()
                objective = j
                if loss in ("balanced", "distill"):
                    jg, counts = group_means(per_row, g, n_groups)
                    objective = jg[counts > 0].mean()
                elif loss in ("equalized", "ceag"):
                    jg, counts = group_means(per_row, g, n_groups)
                    present = counts > 0
                    gap = (jg - j) * present
                    lam_t = torch.as_tensor(lam, dtype=per_row.dtype, device=device)
                    if loss == "equalized":
                        objective = j + (lam_t * gap.abs()).sum()
                    else:
                        objective = j + (lam_t * gap).sum()
                opt.zero_grad()
                objective.backward()
                with torch.no_grad():
                    for n, m in mask_t.items():
                        p = mod.params[n]
                        if p.grad is not None:
                            p.grad.mul_(m)
                opt.step()
                apply_masks_to_weights(mod, mask_t)
                # dual steps on the values measured before this primal step
                if loss == "equalized":
                    lam = equalized_dual_step(lam, gap.detach().cpu().numpy(), present.cpu().numpy(), dual_lr)
                elif loss == "ceag":
                    correct = logits.detach().argmax(1).cpu().numpy() == train.y[idx]
                    buffer.update(train.group_ids[idx], correct)
                    psi = excess_gaps(buffer.accuracies(), dense_group_acc, shares, buffer.ready())
                    lam = ceag_dual_step(lam, psi, eps_c, dual_lr)
                total += float(per_row.detach().sum())
                rows += len(idx)
            key = record(epoch, total / max(rows, 1))
            later_keys.append(key)
            if diverged:  # NaN weights stay NaN: later epochs cannot recover
                break
            if key > best_key:
                best_key, best_state = key, snapshot()
                result.best_epoch = epoch
            # a constrained run waits for a feasible epoch: its violation may grow while the multipliers build up
            elif patience is not None and epoch - result.best_epoch >= patience and result.best.feasible:
                result.stopped_early = epoch < epochs
                break
    finally:
        with torch.no_grad():
            for n, t in best_state.items():
                mod.params[n].copy_(t)
        for n, p in mod.params.items():
            p.requires_grad_(saved_flags[n])
    if result.stopped_early:
        say(f"fine-tune: stopped after epoch {len(result.history) - 1} of {epochs}, {patience} without a new best")
    if diverged:
        say(f"warning: fine-tuning diverged at epoch {diverged[0]} (non-finite loss); kept epoch {result.best_epoch}: "
            "lower --finetune-lr")
    elif not result.best.feasible:
        say(f"warning: fine-tuning met the {loss} constraint in no epoch on validation (tolerance {result.tolerance}); "
            f"kept epoch {result.best_epoch}, the smallest violation ({result.best.val_violation:.3f}): "
            + ("raise --eps or fine-tune longer" if loss == "ceag" else "fine-tune longer"))
    elif later_keys and all(k < first_key for k in later_keys) and loss not in ("equalized", "ceag"):
        say("warning: fine-tuning never beat the pruned weights on validation, so they are kept as they were: "
            f"try a lower --finetune-lr than {lr:g} (e.g. {lr / 10:g})")
    elif result.best_epoch != len(result.history) - 1:
        say(f"fine-tune: restored epoch {result.best_epoch} (best on validation)")
    cost = result.constraint_cost()
    if cost is not None and cost["val_accuracy"] - result.best.val_accuracy >= 0.05:
        hint = "raise --eps or fine-tune longer" if loss == "ceag" else "fine-tune longer or use --finetune-loss ceag"
        say(f"warning: the {loss} constraint holds only at val accuracy {100 * result.best.val_accuracy:.1f}% "
            f"(epoch {result.best_epoch}); epoch {cost['epoch']} reached {100 * cost['val_accuracy']:.1f}% "
            f"with violation {cost['val_violation']:.3f} (tolerance {result.tolerance}): {hint}")
    return result
