"""One pruning run end to end: analyse, score, select, (fine-tune), rewrite, evaluate, report.

The ONNX graph stays the source of truth. The interpreter is a view of it whose parameters carry the ONNX
initializer names, so masks, scores and fine-tuned weights map back without translation tables.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable

import numpy as np
import onnx

from onnxfair import __version__, settings
from onnxfair.data import GroupedDataset, shapes_from_rows
from onnxfair.errors import DataError, UsageError
from onnxfair.head import several_outputs_note
from onnxfair.runtime import collecting_warnings, keeping_warnings, warn_once

GRADIENT_METHODS = ("taylor", "fairgrape", "conflict")
METHODS = ("magnitude",) + GRADIENT_METHODS + ("bilevel",)
REPAIR_MODES = ("none", "balanced", "plain")  # statistics repair after selection (onnxfair.repair)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
NO_UNSTRUCTURED_WEIGHTS = ("nothing prunable in this graph: no Conv/Gemm/MatMul/LSTM/GRU/RNN weight initializers (a "
                           "weight computed at run time, through a Cast say, is pruned with --structured only)")
MAX_LR = 10.0  # fine-tuning learning rates above this only destroy the weights (and near 1e37 overflow)
MAX_ITERATIONS = 1000  # the step schedule is built in memory, one full rescoring per step


@dataclass
class PruneConfig:
    """Every setting of a run; the report repeats all of them so a run can be reproduced."""

    method: str = "fairgrape"
    structured: bool = True
    sparsity: float | None = None
    target_macs: float | None = None
    scope: str = "global"
    round_to: int = 8
    iterations: int = 1
    loss: str = "ce"
    beta: float = 0.75
    gamma: float = 5.0
    damping: float = 0.0  # fairgrape: damped-Fisher saliency (criteria.damped); 0 is the paper's importance
    finetune_epochs: int = 0
    step_epochs: int = 0  # fine-tuning between iterative steps (before rescoring), as the FairGRAPE paper retrains
    repair: str = "none"  # statistics repair after selection: none | balanced | plain (see repair.py)
    finetune_loss: str = "ce"
    finetune_lr: float = 1e-3
    finetune_eps: float = 0.02
    finetune_patience: int = 3  # epochs without a new best on validation before stopping; 0: never stop
    bilevel_steps: int = 200
    bilevel_alpha: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch and onnxruntime intra-op threads, layers ranked at once; 0 = their defaults
    batch_size: int = 64
    eval_split: float = 0.3
    split_seed: int | None = None  # seed of the held-out split without eval data; None: `seed` (a sweep pins it)
    ignore: tuple[str, ...] = ()
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    latency: bool = True
    latency_batch: int = 1
    sparse_storage: bool = False

    @property
    def uses_gradients(self) -> bool:
        """Whether the run backpropagates through the interpreter: to score, to learn masks, or to fine-tune."""
        return self.method != "magnitude" or bool(self.finetune_epochs or self.step_epochs)

    def validate(self, has_data: bool) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if (self.sparsity is None) == (self.target_macs is None):
            raise UsageError("give exactly one budget: --sparsity F (fraction removed) or --target-macs F (fraction of MACs kept)")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise UsageError(f"--sparsity {self.sparsity} is outside (0, 1); it is the fraction removed, e.g. 0.5")
        if self.target_macs is not None:
            if not 0.0 < self.target_macs < 1.0:
                raise UsageError(f"--target-macs {self.target_macs} is outside (0, 1); it is the fraction of MACs kept")
            if not self.structured:
                raise UsageError("--target-macs needs --structured: zeros do not reduce MACs; use --sparsity with --unstructured")
        if self.method != "magnitude" and not has_data:
            raise UsageError(f"--method {self.method} scores with data: pass --data and --groups (or use --method magnitude)")
        if self.finetune_epochs and not has_data:
            raise UsageError("--finetune-epochs needs --data and --groups")
        settings.check_seed(self.seed, "--seed")
        if self.split_seed is not None:
            settings.check_seed(self.split_seed, "--split-seed")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise UsageError(f"--iterations {self.iterations} is outside 1..{MAX_ITERATIONS}; each step rescores the "
                             "whole model (the FairGRAPE paper takes 7-22 steps)")
        if self.step_epochs < 0 or self.finetune_epochs < 0:
            raise UsageError("--finetune-epochs and --step-epochs count epochs: 0 or more")
        if self.method == "bilevel" and self.iterations > 1:
            raise UsageError("--method bilevel is not iterative; drop --iterations")
        if self.step_epochs and not has_data:
            raise UsageError("--step-epochs needs --data and --groups")
        if self.round_to < 1:
            raise UsageError("--round-to must be at least 1 (1 disables rounding)")
        if not (self.damping >= 0.0 and math.isfinite(self.damping)):
            raise UsageError(f"--damping {self.damping} must be a finite number >= 0 (0: the paper's fairgrape importance)")
        if not 0.0 < self.finetune_lr <= MAX_LR:  # also refuses NaN; far larger values overflow Adam's float32 step
            raise UsageError(f"--finetune-lr {self.finetune_lr:g} is outside (0, {MAX_LR:g}]; Adam moves each weight by "
                             "about the learning rate per step, so give a small one, e.g. 1e-3")
        if self.finetune_patience < 0:
            raise UsageError("--patience counts epochs: 0 (never stop early) or more")
        if not (self.bilevel_alpha >= 0.0 and math.isfinite(self.bilevel_alpha)):
            raise UsageError(f"--bilevel-alpha {self.bilevel_alpha} must be a finite number >= 0 (0: no fairness penalty)")
        settings.check_pw(self.beta, self.gamma)
        if not 0.0 <= self.finetune_eps <= 1.0:
            raise UsageError(f"--eps {self.finetune_eps} is outside [0, 1]; it is the tolerated excess accuracy gap, e.g. 0.02")
        if self.repair not in REPAIR_MODES:
            raise UsageError(f"unknown --repair {self.repair!r}; choose one of {', '.join(REPAIR_MODES)}")
        if self.repair != "none" and not has_data:
            raise UsageError("--repair measures statistics on data: pass --data and --groups (or --repair none)")
        unused = self.unused_settings()
        if unused:
            raise UsageError(unused_message(self, unused, "this run"))
        from onnxfair.interpret.device import torch_device

        torch_device(self.device)  # --device cuda on a machine without one, before any work (and every sweep run)

    def unused_settings(self) -> list[str]:
        """The fields moved from their default that this run never reads (see `onnxfair.settings`)."""
        fine_tunes = self.finetune_epochs > 0 or self.step_epochs > 0
        scores_with_loss = self.method != "magnitude"
        pw = (scores_with_loss and self.loss == "pw") or (fine_tunes and self.finetune_loss == "pw")
        reads = {
            "damping": self.method == "fairgrape",
            "bilevel_steps": self.method == "bilevel",
            "bilevel_alpha": self.method == "bilevel",
            "loss": scores_with_loss,
            "beta": pw,
            "gamma": pw,
            "finetune_loss": fine_tunes,
            "finetune_lr": fine_tunes,
            "finetune_eps": fine_tunes and self.finetune_loss == "ceag",
            "finetune_patience": fine_tunes,
            "step_epochs": self.iterations > 1,
            "round_to": self.structured,
            "sparse_storage": not self.structured,
            "latency_batch": self.latency,
        }
        return settings.moved_and_unread(self, reads)

    def with_defaults(self, names: list[str]) -> "PruneConfig":
        """A copy with these fields back at their defaults."""
        default = settings.defaults(PruneConfig)
        return dataclasses.replace(self, **{name: default[name] for name in names})


# field: (option, what reads it); `PruneConfig.unused_settings` says when
READ_BY = {
    "damping": ("--damping", "the fairgrape method"),
    "bilevel_steps": ("--bilevel-steps", "the bilevel method"),
    "bilevel_alpha": ("--bilevel-alpha", "the bilevel method"),
    "loss": ("--loss", "a method that scores with data (magnitude reads only the weights)"),
    "beta": ("--beta", "the pw loss (--loss pw with a method that scores with data, or --finetune-loss pw)"),
    "gamma": ("--gamma", "the pw loss (--loss pw with a method that scores with data, or --finetune-loss pw)"),
    "finetune_loss": ("--finetune-loss", "fine-tuning (--finetune-epochs N, or --step-epochs N with --iterations)"),
    "finetune_lr": ("--finetune-lr", "fine-tuning (--finetune-epochs N, or --step-epochs N with --iterations)"),
    "finetune_eps": ("--eps", "fine-tuning with --finetune-loss ceag"),
    "finetune_patience": ("--patience", "fine-tuning (--finetune-epochs N, or --step-epochs N with --iterations)"),
    "step_epochs": ("--step-epochs", "an iterative schedule (--iterations 2 or more)"),
    "round_to": ("--round-to", "structured pruning (--unstructured zeroes single weights)"),
    "sparse_storage": ("--sparse-storage", "--unstructured (structured pruning removes channels and leaves no zeros)"),
    "latency_batch": ("--latency-batch", "latency timing (--no-latency skips it)"),
}


def unused_message(cfg: PruneConfig, unused: list[str], where: str) -> str:
    """The refusal of `unused` (from `PruneConfig.unused_settings`) on `where` ("this run", a sweep)."""
    return settings.unused_message(cfg, unused, READ_BY, where)


@dataclass
class DenseCache:
    """What a run computes from the dense model alone, kept for the next run on the same inputs.

    A sweep prunes one model many times; with a cache a process analyses the graph and evaluates the dense
    model once per distinct setting instead of once per run. Entries are keyed by every setting they
    depend on and dropped when `prune_model` is called with other model or data objects. Cached values
    are shared between runs and must be treated as read-only (the evaluation block is copied out).
    """

    inputs: tuple = ()
    values: dict = field(default_factory=dict)

    def bind(self, *inputs: object) -> None:
        """Start over when the model or data objects differ from those the entries were computed on."""
        if len(inputs) != len(self.inputs) or any(a is not b for a, b in zip(inputs, self.inputs)):
            self.inputs, self.values = inputs, {}

    def get(self, key: tuple, compute: Callable[[], object]) -> object:
        """The value stored under `key`, computed on first use."""
        if key not in self.values:
            self.values[key] = compute()
        return self.values[key]


def _check_runtime_loads(model: onnx.ModelProto, cfg: PruneConfig) -> bool:
    """Raise, before any scoring, when onnxruntime cannot load the input model, since the before/after
    evaluation would fail only after the work was done."""
    from onnxfair.errors import ModelError
    from onnxfair.interpret import unsupported_ops
    from onnxfair.runtime import create_session

    if unsupported_ops(model):  # refused with the ops named (and the fix) when the graph is interpreted
        return False
    try:
        create_session(model, cfg.device, cfg.input_shapes or None, cfg.threads)
    except ModelError as exc:
        doubles = any(i.data_type == onnx.TensorProto.DOUBLE for i in model.graph.initializer)
        fix = ("; export it in float32: onnxruntime's CPU provider lacks float64 kernels for Conv and other ops"
               if doubles and "Could not find an implementation" in str(exc) else "")
        raise ModelError(f"{exc}; nothing was pruned (the evaluation and timing run the model there){fix}") from None
    return True


def no_channel_groups(model: onnx.ModelProto, an, ignore: tuple[str, ...] = ()) -> Exception:
    """The error for a graph without prunable channel groups: the ops nothing can interpret when the graph
    has any (unstructured pruning would stop on them too), else why the channels are frozen, and the fixes
    that would work (--unstructured only when it finds weights that `ignore` leaves)."""
    from onnxfair.errors import UnsupportedError
    from onnxfair.graph.fold import RECURRENT_OPS
    from onnxfair.interpret import unsupported_ops
    from onnxfair.interpret.compile import refusal_message

    refused = unsupported_ops(model)
    if refused:
        return UnsupportedError(refusal_message(refused))
    # a space frozen for several reasons gives them joined by "; ": each reason is named once
    every = sorted({r for f in an.frozen for r in f["reason"].split("; ")})
    recurrent = sorted({n.op_type for n in model.graph.node if n.op_type in RECURRENT_OPS})
    if recurrent:  # their hidden units hold most weights of a text model, and no rule removes them
        every.insert(0, f"{'/'.join(recurrent)} hidden units are not removed by channel pruning")
    reasons = "; ".join(every[:3]) or "no Conv/Gemm/MatMul channels"
    structural = [r for r in every if "graph output" not in r]
    ignored_only = bool(structural) and all("matches ignore pattern" in r for r in structural)
    fixes = ["narrow --ignore"] if ignored_only else []
    if set(weight_names(unstructured_view(model))) - ignored_initializers(model, ignore):
        fixes.append("try --unstructured")
    return UsageError(f"nothing prunable in this graph ({reasons}); " + (" or ".join(fixes) or "unstructured pruning finds no weight either"))


def prunable_units(model: onnx.ModelProto, cfg: PruneConfig,
                   analysis: Callable[[], Any]) -> tuple[Any, onnx.ModelProto, list]:
    """What a run prunes: (analysis, the graph it rewrites, its channel groups) structured, or (None, the
    unstructured view, its weight names); refused in one line when there is nothing, so a sweep can ask
    before its first run."""
    if cfg.structured:
        an = analysis()
        if not an.groups:
            raise no_channel_groups(model, an, cfg.ignore)
        return an, an.model, an.groups
    dense = unstructured_view(model)
    units = weight_names(dense)
    if not units:
        raise UsageError(NO_UNSTRUCTURED_WEIGHTS)
    units = scored_weights(dense, units)
    if cfg.ignore:
        ignored = ignored_initializers(model, cfg.ignore)
        units = [u for u in units if u not in ignored]
        if not units:
            names = weight_names(dense)
            raise UsageError(f"--ignore {' '.join(cfg.ignore)} covers every prunable weight "
                             f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); narrow the pattern")
    return None, dense, units


def scored_weights(dense: onnx.ModelProto, units: list[str]) -> list[str]:
    """The weights that change the first output, the one scored and judged: another output's own layers have
    zero gradient and no say in the evaluation, so a gradient criterion would spend the budget on them."""
    from onnxfair.graph.fold import upstream_nodes

    g = dense.graph
    read = {x for i in upstream_nodes(g, [g.output[0].name]) for x in g.node[i].input}
    kept = [u for u in units if u in read]
    if not kept:
        raise UsageError(f"no prunable weight feeds the first output {g.output[0].name!r}, the one scored and judged "
                         f"({', '.join(units[:3])} feed only the others); re-export the model with the class scores "
                         "as its first output")
    return kept


def shapes_key(shapes: dict[str, tuple[int, ...]]) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in shapes.items()))


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: dict
    markdown: str = ""


class _Timer:
    """Wall time per phase, reported under `timing`. Phases are exclusive: one opened inside another
    (fine-tuning between iterative steps, inside score+select) pauses it, so the figures add up."""

    def __init__(self, progress: Callable[[str], None]):
        self.phases: dict[str, float] = {}
        self.progress = progress
        self._open: list[list] = []  # [name, start of its current stretch]

    def _charge(self, now: float) -> None:
        if self._open:
            name, start = self._open[-1]
            self.phases[name] = self.phases.get(name, 0.0) + now - start

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.progress(f"[{name}] ...")
        t0 = time.perf_counter()
        self._charge(t0)
        self._open.append([name, t0])
        before = self.phases.get(name, 0.0)
        try:
            yield
        finally:
            now = time.perf_counter()
            self._charge(now)
            self._open.pop()
            if self._open:
                self._open[-1][1] = now
        self.progress(f"[{name}] done in {self.phases[name] - before:.2f}s")


def versions() -> dict[str, str]:
    import torch

    out = {"onnxfair": __version__, "onnx": onnx.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def unstructured_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph unstructured pruning zeros weights in: sparse initializers (a --sparse-storage output)
    densified, and Constant-held weights made initializers, so they are pruned like any other."""
    from onnxfair.graph import to_dense_storage
    from onnxfair.graph.fold import constant_weights_to_initializers

    dense = to_dense_storage(model) if model.graph.sparse_initializer else model
    return constant_weights_to_initializers(dense, WEIGHT_OPS)


def weight_names(model: onnx.ModelProto) -> list[str]:
    """Initializers that unstructured pruning may zero: the weight of Conv/ConvTranspose/Gemm/MatMul, 2-D or
    more, on whichever side of a MatMul it sits, and a recurrent layer's W and R (`weight_operands`)."""
    from onnxfair.graph.fold import weight_operands

    inits = {i.name: i for i in model.graph.initializer}

    def is_weight(name: str) -> bool:
        return name in inits and len(inits[name].dims) >= 2

    names: list[str] = []
    for node in model.graph.node:
        for name in weight_operands(node, is_weight) if node.op_type in WEIGHT_OPS else []:
            if name not in names:
                names.append(name)
    return names


def held_out_seed(cfg: PruneConfig) -> int:
    """The seed of the held-out split: `split_seed`, else the run's seed."""
    return cfg.seed if cfg.split_seed is None else cfg.split_seed


def _split_eval(calib: GroupedDataset | None, eval_ds: GroupedDataset | None, cfg: PruneConfig):
    """Scoring uses calib; evaluation uses eval_ds or a seeded, group-stratified held-out part of calib."""
    if calib is None or eval_ds is not None:
        return calib, eval_ds, ("eval-data" if eval_ds is not None else None)
    fit, held = calib.split(cfg.eval_split, seed=held_out_seed(cfg))
    if len(held) == 0:
        raise UsageError(f"--data has {len(calib)} row{'s' * (len(calib) != 1)} and no group with 2, so none can be held out for the "
                         "before/after evaluation; pass --eval-data or more rows")
    return fit, held, f"held-out {cfg.eval_split:.0%} of --data (seed {held_out_seed(cfg)}, stratified by group)"


def prune_model(
    model: onnx.ModelProto,
    calib: GroupedDataset | None,
    eval_ds: GroupedDataset | None,
    cfg: PruneConfig,
    progress: Callable[[str], None] = lambda s: None,
    cache: DenseCache | None = None,
) -> PruneResult:
    """Run one method end to end and return the pruned model with its report.

    `cache` (optional) reuses the channel analysis, the dense cost and, when latency is off, the dense model's
    evaluation from earlier calls on the same model and data; the report is the same with or without it.
    The report's `warnings` holds every warning the run gave, through `progress` or printed once per process.
    """
    warnings: list[str] = []
    with collecting_warnings(warnings):
        return _prune_model(model, calib, eval_ds, cfg, keeping_warnings(progress, warnings), cache, warnings)


def _prune_model(model: onnx.ModelProto, calib: GroupedDataset | None, eval_ds: GroupedDataset | None,
                 cfg: PruneConfig, progress: Callable[[str], None], cache: DenseCache | None,
                 warnings: list[str]) -> PruneResult:
    from onnxfair.evaluate import evaluate_models
    from onnxfair.graph import analyze, mask_weights, model_cost, prune_channels
    from onnxfair.graph.cost import nonzero_params, uncounted_note
    from onnxfair.graph.shapes import restore_initializer_inputs

    cfg.validate(has_data=calib is not None)
    if calib is not None:
        shapes = shapes_from_rows(model, cfg.input_shapes, [calib, eval_ds], progress)
        cfg = dataclasses.replace(cfg, input_shapes=shapes)
    timer = _Timer(progress)
    fit, held, eval_source = _split_eval(calib, eval_ds, cfg)
    if (cfg.finetune_epochs or cfg.step_epochs) and fit is not None:  # before the scoring, not after
        train, val = fit.split(0.2, seed=cfg.seed)
        if not len(train) or not len(val):
            raise DataError(f"fine-tuning holds out a fifth of each group's rows for early stopping (a group needs 2 "
                            f"rows to give one): the {len(fit)} rows it may use leave {len(train)} to train and "
                            f"{len(val)} to validate; pass more rows in --data")
    structure: dict = {}
    if cache is not None:
        cache.bind(model, calib, eval_ds)
    size_key = shapes_key(cfg.input_shapes or {})

    def analysis():
        return analyze(model, input_shapes=cfg.input_shapes or None, ignore=cfg.ignore)

    with timer("analyse"):
        if held is not None or cfg.latency:  # both run the input in onnxruntime: a model it cannot load is told now
            cache_get = cache.get if cache is not None else (lambda _key, compute: compute())
            cache_get(("loads", cfg.device, size_key, cfg.threads), lambda: _check_runtime_loads(model, cfg))
        note = several_outputs_note(model, "the input model")  # said before scoring, which reads the same output
        if note:
            warn_once(note)
            progress("note: layers that feed only the other outputs, if any, are not pruned: nothing scores them")
        unseen = _groups_not_scored(fit, held)
        if unseen:
            progress(f"warning: {len(unseen)} evaluated group{'s have' if len(unseen) > 1 else ' has'} no rows in "
                     f"the data the method learns from ({', '.join(unseen[:3])}{', ...' if len(unseen) > 3 else ''}): "
                     "nothing protects them; add such rows to --data")
        for pattern in unmatched_patterns(model, cfg.ignore):
            progress(unmatched_warning(pattern))
        an, dense, units = prunable_units(
            model, cfg, analysis if cache is None else lambda: cache.get(("analysis", size_key, tuple(cfg.ignore)),
                                                                          analysis))
        if an is not None:
            note = round_to_note(an.groups, cfg.round_to)
            if note:
                progress(note)

    from onnxfair.pruning_steps import finetune_and_write_back, select_masks

    with timer("score+select"):
        keep, masks, mod, records = select_masks(dense, an, units, fit, cfg, progress, timer)
    structure.update(records)

    if cfg.finetune_epochs:
        with timer("finetune"):
            dense_for_rewrite, structure["finetune"] = finetune_and_write_back(dense, mod, masks, fit, cfg, progress)
    elif cfg.method == "bilevel" or records:
        dense_for_rewrite = mod.to_onnx(dense)  # weights trained or repaired with the masks
    else:
        dense_for_rewrite = dense

    with timer("rewrite"):
        if cfg.structured:
            pruned = restore_initializer_inputs(prune_channels(dataclasses.replace(an, model=dense_for_rewrite), keep),
                                                model)
            note = cast_weights_note(model, pruned)
            if note:
                progress(note)
            if cfg.input_shapes:
                from onnxfair.graph.shapes import restore_symbolic_io

                pruned = restore_symbolic_io(pruned, model)
            structure["groups"] = kept_channels(an.groups, keep)
            structure["channels"] = channel_counts(structure["groups"])
            note = sparsity_miss_note(cfg, structure["groups"]) if cfg.sparsity is not None else None
            if note:
                progress(note)
        else:
            pruned = mask_weights(dense_for_rewrite, masks)
            # counted in the written weights, so a model that already had zeros is described as it is
            written = _zeros_by_initializer(pruned, masks)
            before = _zeros_by_initializer(dense, masks)  # densified: a --sparse-storage input's zeros count
            total = sum(int(m.size) for m in masks.values())
            zeros = sum(written.values())
            structure["weights"] = {"prunable": total, "zeroed": zeros, "sparsity": zeros / max(total, 1),
                                    "zero_before": sum(before.values())}
            structure["layers"] = [{"name": n, "weights": int(m.size), "kept": int(m.size) - written[n]}
                                   for n, m in masks.items()]
            share = zeros / max(total, 1)
            if cfg.sparsity is not None and share > cfg.sparsity + 0.02 and sum(before.values()):
                progress(f"note: {share:.3f} of the prunable weights are zero, not {cfg.sparsity}: "
                         f"the input model already had {sum(before.values()):,} zero weights")
            elif cfg.sparsity is not None and abs(share - cfg.sparsity) > 0.02:
                why = (f"{zeros} of {total} weights is the nearest whole count" if cfg.scope == "global" else
                       "each layer removes round(sparsity x its size) of its weights, and small layers land furthest "
                       "from the fraction; --scope global rounds the total once")
                progress(f"warning: {share:.3f} of the prunable weights removed, not {cfg.sparsity}: {why}")
            emptied = [n for n, m in masks.items() if m.size and not np.count_nonzero(m)]
            if emptied:  # the layer's output no longer depends on its input
                fix = ("use --scope layer or a lower --sparsity" if cfg.scope == "global"
                       else "lower --sparsity (a layer of n weights keeps n - round(sparsity * n))")
                progress(f"warning: every weight of {', '.join(emptied[:3])} was removed; {fix}")
            if cfg.sparse_storage:
                from onnxfair.graph import to_sparse_storage

                pruned = to_sparse_storage(pruned)
                if not pruned.graph.sparse_initializer:
                    from onnx import helper

                    sizes = sorted({np.dtype(helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
                                    for i in pruned.graph.initializer if i.name in set(units)})
                    need = ", ".join(f"{1 - k / (k + 8):.0%} zeros for {k}-byte values" for k in sizes)
                    progress(f"note: --sparse-storage stored no weight sparse: a weight's values plus int64 indices "
                             f"take less room than the dense tensor only above {need}")
            structure["note"] = (
                "unstructured zeros reduce file size only when stored sparse or compressed; "
                "onnxruntime gains no latency from zeros"
            )

    with timer("cost"):
        def dense_cost():
            return model_cost(model, cfg.input_shapes or None)
        cd = dense_cost() if cache is None else cache.get(("cost", size_key), dense_cost)
        cp = model_cost(pruned, cfg.input_shapes or None)
        cost = {
            "macs_dense": cd.macs, "macs_pruned": cp.macs, "params_dense": cd.params, "params_pruned": cp.params,
            "bytes_dense": cd.bytes, "bytes_pruned": cp.bytes,
            "macs_ratio": cp.macs / max(cd.macs, 1), "params_ratio": cp.params / max(cd.params, 1),
            "macs_uncounted": sorted(set(cd.unknown) | set(cp.unknown)), "macs_batch": cd.batch,
        }
        note = uncounted_note(cost["macs_uncounted"])
        if note:
            progress(f"warning: {note}")
        if not cfg.structured:
            cost["params_nonzero_pruned"] = nonzero_params(pruned)
        if cfg.target_macs is not None and cost["macs_ratio"] < 0.9 * cfg.target_macs:  # 10 % under the budget
            other = ("--scope global (one ranking over every group)" if cfg.scope == "layer"
                     else "--scope layer (the same fraction from every group)")
            fix = "a smaller --round-to fits more closely" if cfg.round_to > 1 else f"{other} fits differently"
            how = ("every group keeps the same fraction" if cfg.scope == "layer"
                   else "channels go in the ranking's order")
            progress(f"warning: {cost['macs_ratio']:.3f} of the MACs kept, not {cfg.target_macs} (--target-macs): "
                     f"{how}, in blocks of --round-to {cfg.round_to}, and no closer fit was found; {fix}")

    report: dict = {
        "onnxfair_report": 1,
        "method": {**_settings(cfg), "versions": versions()},
        "structure": structure,
        "cost": cost,
    }
    if held is not None:
        with timer("evaluate"):
            from onnxfair.metrics import degradation, std_delta_uncertainty

            eval_kw = {"device": cfg.device, "batch_size": 256, "latency_batch": cfg.latency_batch,
                       "input_shapes": cfg.input_shapes or None, "threads": cfg.threads}
            correct: list[np.ndarray] = []
            if cache is None or cfg.latency:  # latency interleaves dense and pruned repetitions: both run here
                bd, bp = evaluate_models([model, pruned], held, latency=cfg.latency, phase=timer,
                                         names=["the input model", "the pruned model"], correct=correct, **eval_kw)
            else:
                held_rows = ("eval-data",) if eval_ds is not None else ("split", cfg.eval_split, held_out_seed(cfg))
                key = ("evaluation", held_rows, cfg.device, size_key, cfg.threads)

                def dense_evaluation() -> tuple[dict, list[np.ndarray]]:
                    rows: list[np.ndarray] = []
                    return evaluate_models([model], held, latency=False, names=["the input model"], correct=rows,
                                           **eval_kw)[0], rows
                dense_block, dense_rows = cache.get(key, dense_evaluation)
                bd = copy.deepcopy(dense_block)
                correct += dense_rows
                (bp,) = evaluate_models([pruned], held, latency=False, names=["the pruned model"], correct=correct,
                                        **eval_kw)
        report["evaluation"] = {"source": eval_source, "n": len(held), "groups_by": held.attributes}
        report["dense"], report["pruned"] = bd, bp
        report["degradation"] = {**degradation(bd, bp),
                                 **std_delta_uncertainty(*correct, held.group_ids, cfg.seed)}
        _hint_on_a_large_drop(report["degradation"]["overall_delta"], cfg, dense, progress)
        if cfg.latency:
            report["latency"] = latency_summary(bd.pop("latency"), bp.pop("latency"))
    elif cfg.latency:
        with timer("latency"):
            report["latency"] = _latency_without_data(model, pruned, cfg)
    report.setdefault("latency", None)  # null when not measured: the document keeps one shape
    report["timing"] = {k: round(v, 4) for k, v in timer.phases.items()}
    report["warnings"] = warnings
    from onnxfair.report import prune_markdown

    return PruneResult(pruned, report, prune_markdown(report))


def _hint_on_a_large_drop(overall_delta: float, cfg: PruneConfig, model: onnx.ModelProto,
                          progress: Callable[[str], None]) -> None:
    """Name the weight updates that were not used when pruning cost more than 10 accuracy points."""
    if overall_delta > -0.10 or cfg.finetune_epochs:
        return
    remedies = []
    if cfg.repair == "none" and any(n.op_type in ("Conv", "Gemm") and len(n.input) > 2 for n in model.graph.node):
        remedies.append("--repair balanced re-normalises the pruned layers (no gradients; for BatchNorm-folded CNNs)")
    remedies.append("--finetune-epochs N retrains the remaining weights")
    progress(f"hint: accuracy fell by {-100 * overall_delta:.1f} points; " + "; ".join(remedies))


def _settings(cfg: PruneConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["input_shapes"] = {k: list(v) for k, v in cfg.input_shapes.items()}
    d["ignore"] = list(cfg.ignore)
    d["kind"] = "structured" if cfg.structured else "unstructured"
    return d


def unmatched_warning(pattern: str) -> str:
    return (f"warning: --ignore {pattern!r} matches no node or initializer name (case matters); "
            "onnxfair inspect --groups --json - lists them (group names and member initializers)")


def _zeros_by_initializer(model: onnx.ModelProto, names) -> dict[str, int]:
    """Exact zeros in each named initializer of `model`."""
    from onnx import numpy_helper

    wanted = set(names)
    return {i.name: int(i_arr.size - np.count_nonzero(i_arr))
            for i in model.graph.initializer if i.name in wanted for i_arr in [numpy_helper.to_array(i)]}


def cast_weights_note(model: onnx.ModelProto, pruned: onnx.ModelProto) -> str | None:
    """The warning when the structured output stores weights in a float type the input never stored:
    weights kept as float16 and Cast up at run time are folded (the rewrite slices initializers) and
    written in the type they are computed in, which can make the file larger, not smaller."""
    from onnx import helper

    from onnxfair.model import FLOAT_TYPES

    def types(m: onnx.ModelProto) -> set[int]:
        return {i.data_type for i in m.graph.initializer if i.data_type in FLOAT_TYPES}

    new = types(pruned) - types(model)
    if not new or not types(model):
        return None
    name = lambda t: np.dtype(helper.tensor_dtype_to_np_dtype(t)).name  # noqa: E731
    return (f"warning: weights the input stores as {', '.join(sorted(map(name, types(model))))} and casts at run "
            f"time are written as {', '.join(sorted(map(name, new)))}: the channel rewrite folds such Casts to "
            "slice the weights, so the file may grow")


def round_to_note(groups, round_to: int) -> str | None:
    """The warning for channel groups no larger than --round-to, which rounding could only keep whole."""
    small = [g for g in groups if g.size <= round_to] if round_to > 1 else []
    if not small:
        return None
    sizes = sorted({g.size for g in small})
    shown = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return (f"warning: --round-to {round_to} is not below the size of {len(small)} of the {len(groups)} channel "
            f"groups ({shown} channels); rounded, they could only be kept whole, so their counts go in single channels")


def kept_channels(groups, keep: dict[int, np.ndarray]) -> list[dict]:
    """Each channel group's id, name, size and kept count (a group `keep` leaves out is kept whole)."""
    return [{"id": g.id, "name": g.name, "channels": g.size, "kept": int(len(keep.get(g.id, range(g.size))))}
            for g in groups]


def channel_counts(groups: list[dict]) -> dict:
    """The report's `structure.channels`: prunable, removed and their ratio, from kept_channels' rows."""
    total = sum(g["channels"] for g in groups)
    removed = total - sum(g["kept"] for g in groups)
    return {"prunable": total, "removed": removed, "sparsity": removed / max(total, 1)}


def sparsity_miss_note(cfg, groups: list[dict]) -> str | None:
    """The warning when the channels removed miss --sparsity by more than 0.02, with the reason; `cfg` has
    sparsity, scope and round_to (a prune or risk config)."""
    removed = channel_counts(groups)["sparsity"]
    if abs(cfg.sparsity - removed) <= 0.02:
        return None
    return (f"warning: {removed:.3f} of the channels removed, not {cfg.sparsity}: "
            f"{_sparsity_miss_reason(cfg, groups, removed)}")


def _sparsity_miss_reason(cfg, groups: list[dict], removed: float) -> str:
    """Why the channels removed miss --sparsity: a floor every group keeps (a shortfall with groups at it), or
    counts rounded to multiples of --round-to."""
    def at_floor(g: dict) -> bool:
        """Kept at its floor (one block), and held there by it: under layer scope only when the fraction asks
        for fewer channels than a block (a group whose own fraction rounds to one block is not short)."""
        floor = min(max(cfg.round_to, 1), g["channels"])
        if not g["kept"] == floor < g["channels"]:
            return False
        return cfg.scope == "global" or g["channels"] * (1 - cfg.sparsity) < floor

    floors = [g for g in groups if at_floor(g)]
    if removed < cfg.sparsity and floors:
        return (f"every group keeps at least one block of --round-to {cfg.round_to} ({len(floors)} at it); lower "
                "--round-to for a closer fit" if cfg.round_to > 1 else "every group keeps at least one channel")
    if cfg.round_to <= 1:
        total = sum(g["channels"] for g in groups)
        if cfg.scope == "global":
            return f"{round(removed * total)} of {total} channels is the nearest whole count"
        return (f"each group removes round({cfg.sparsity} x its size) of its channels, and small groups land furthest "
                "from the fraction; --scope global rounds the total once")
    return f"channel counts are rounded to multiples of --round-to {cfg.round_to}; lower --round-to for a closer fit"


def _groups_not_scored(fit: GroupedDataset | None, held: GroupedDataset | None) -> list[str]:
    """Groups the evaluation reports that the scoring and fine-tuning rows lack."""
    if fit is None or held is None:
        return []
    present = {g for g, n in fit.group_counts().items() if n}
    return [g for g, n in held.group_counts().items() if n and g not in present]


def unmatched_patterns(model: onnx.ModelProto, patterns: tuple[str, ...]) -> list[str]:
    """--ignore patterns that name nothing in the graph: most likely a typo, which would prune what was meant
    to be kept."""
    names = [n.name for n in model.graph.node if n.name] + [i.name for i in model.graph.initializer]
    return [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]


def ignored_initializers(model: onnx.ModelProto, patterns: tuple[str, ...]) -> set[str]:
    """Initializers --ignore keeps: named by a pattern, or read by a node a pattern names (as the channel
    analysis does for structured pruning)."""
    kept = {i.name for i in model.graph.initializer if any(fnmatchcase(i.name, p) for p in patterns)}
    for node in model.graph.node:
        if node.name and any(fnmatchcase(node.name, p) for p in patterns):
            kept.update(node.input)
    return kept


def latency_summary(dense: dict, pruned: dict) -> dict:
    """Both timings and the speedup of the pruned model."""
    return {"dense": dense, "pruned": pruned, "speedup": dense["median_ms"] / max(pruned["median_ms"], 1e-9)}


def _latency_without_data(model: onnx.ModelProto, pruned: onnx.ModelProto, cfg: PruneConfig) -> dict:
    """Without data, time both models on seeded random inputs of the model's shape, at the batch the
    evaluation path would use (`timing_batch`: the graph's own when it fixes one)."""
    from onnxfair.model import fix_input_shapes, input_specs
    from onnxfair.runtime import create_session, measure_latency, timing_batch

    sessions = [create_session(m, cfg.device, cfg.input_shapes or None, cfg.threads) for m in (model, pruned)]
    batch = timing_batch(sessions, cfg.latency_batch)
    rng = np.random.default_rng(cfg.seed)
    feed = {}
    for spec in input_specs(fix_input_shapes(model, cfg.input_shapes)):
        shape = [batch, *spec.shape[1:]] if spec.shape else []
        if any(not isinstance(d, int) for d in shape):
            raise UsageError(f"input {spec.name!r} has symbolic dims {spec.shape}; pass --input-shape {spec.name}=d0,d1,...")
        feed[spec.name] = (rng.standard_normal(shape) if spec.dtype.kind == "f" else np.zeros(shape)).astype(spec.dtype)
    dense, pr = measure_latency(sessions, feed)
    return latency_summary(dense, pr)
