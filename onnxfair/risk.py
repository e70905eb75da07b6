"""Bias-risk pre-check: which demographic groups will a magnitude pruning mask hurt, before pruning.

Per group g, on the calibration data and the dense model, with L_g the mean loss over g's rows:

- n, accuracy, mean loss;
- the gradient norm ||grad L_g|| over the parameter set P (see `params` below);
- a Hutchinson estimate of tr(H_g) over P: the mean over K seeded Rademacher vectors v of v^T H_g v, each
  Hessian-vector product exact (double backward through the ONNX interpreter). The same K vectors serve
  every group (common random numbers), so differences between groups are not Monte-Carlo noise between
  independent draws; the standard error over the K draws is reported;
- the share of uncertain predictions: top-class probability in the open interval (0.1, 0.9);
- the predicted loss change of the magnitude mask at the given sparsity (Tran et al., NeurIPS 2022):
  with delta = masked weights - weights (-w on removed weights, 0 elsewhere),
  dL_g ~ g_g^T delta + 1/2 delta^T H_g delta, the quadratic term from one exact product H_g delta;
- the measured loss change of the same mask (forward with the mask applied), to show how good the
  prediction is.

Parameter set P: `params="weights"` (default) is the float initializers that pruning acts on, the weight
operands of Conv, ConvTranspose, Gemm and MatMul (biases, normalisation parameters excluded), plus any
initializer a structured mask touches; `params="all"` is every float initializer. The predicted change needs
only the parameters delta touches, whichever P is chosen.

Ranking: groups with rows, sorted by predicted loss change, largest first (most expected harm first);
ties broken by larger gradient norm, then by label (ascending). Groups without rows are left out.
Sorting by the excess over the overall change (Tran et al.'s framing) gives the same order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from onnxfair import settings
from onnxfair.data import GroupedDataset, shapes_from_rows
from onnxfair.errors import UnsupportedError, UsageError
from onnxfair.head import logit_view, scored_output, several_outputs_note
from onnxfair.interpret.device import torch_device
from onnxfair.interpret.module import batch_output, checked_output
from onnxfair.metrics import SMALL_GROUP
from onnxfair.model import FLOAT_TYPES
from onnxfair.report import json_safe
from onnxfair.runtime import collecting_warnings, keeping_warnings, warn_once

UNCERTAIN_LOW = 0.1
UNCERTAIN_HIGH = 0.9

CONVENTIONS = {
    "mean_loss": "mean per-sample loss over the group's calibration rows (dense model)",
    "grad_norm": "L2 norm of the gradient of the group's mean loss over the parameter set (settings.params)",
    "hessian_trace": "Hutchinson estimate of tr(H_g) over the parameter set: mean of v^T H_g v over K seeded "
    "Rademacher vectors shared by all groups; exact Hessian-vector products (double backward)",
    "uncertain_share": "share of rows whose top-class probability lies in the open interval (0.1, 0.9)",
    "predicted_loss_change": "g_g^T delta + 1/2 delta^T H_g delta, delta = masked - dense weights; exact H_g delta",
    "measured_loss_change": "mean loss of the masked model minus mean loss of the dense model on the group's rows",
    "ranking": "groups with rows by predicted_loss_change, largest first; ties by larger grad_norm, then label",
    "small_group": f"groups with fewer than {SMALL_GROUP} rows are flagged small (their figures are noisy), not dropped",
    "removed_weights": "entries the assessed masks set to zero; a structured mask zeroes the consumer columns that "
    "read the removed channels (equivalent for the loss), so this counts those, not the producer rows that "
    "`onnxfair prune` also drops",
    "non_finite": "a figure that overflows (NaN or infinite, say from a masked model's output) is null",
    "params": "weights: weight operands of Conv/ConvTranspose/Gemm/MatMul plus initializers the mask touches; "
    "all: every float initializer",
}

Progress = Callable[[str], None]


@dataclass
class RiskConfig:
    """Settings of the pre-check; recorded verbatim in the report."""

    sparsity: float = 0.5
    structured: bool = True
    scope: str = "global"
    round_to: int = 8
    params: str = "weights"
    hutchinson_samples: int = 8
    seed: int = 0
    loss: str = "ce"
    beta: float = 0.75
    gamma: float = 5.0
    batch_size: int = 128
    device: str = "auto"

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"--sparsity {self.sparsity} is out of range; give a fraction in [0, 1)")
        if self.scope not in ("layer", "global"):
            raise UsageError(f"--scope {self.scope!r} is not supported; use layer or global")
        if self.params not in ("weights", "all"):
            raise UsageError(f"--params {self.params!r} is not supported; use weights or all")
        if not 0 <= self.hutchinson_samples <= MAX_HUTCHINSON_SAMPLES:
            raise UsageError(f"--hutchinson-samples {self.hutchinson_samples} is outside 0..{MAX_HUTCHINSON_SAMPLES:,}; "
                             "each sample is a Hessian-vector product per batch and group: 8 to 100 is the usual range")
        if self.round_to < 1:
            raise UsageError("--round-to must be at least 1")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        settings.check_seed(self.seed, "--seed")
        settings.check_pw(self.beta, self.gamma)
        if self.loss not in ("ce", "pw"):
            raise UsageError(f"--loss {self.loss!r} is not supported; use ce or pw")
        reads = {"round_to": self.structured, "beta": self.loss == "pw", "gamma": self.loss == "pw",
                 "seed": self.hutchinson_samples > 0}
        unused = settings.moved_and_unread(self, reads)
        if unused:
            raise UsageError(settings.unused_message(self, unused, RISK_READ_BY, "this pre-check"))


MAX_HUTCHINSON_SAMPLES = 10_000  # the estimate's error falls as 1/sqrt(samples): far past any use, far below memory

# field: (option, what reads it); `RiskConfig.check` says when
RISK_READ_BY = {
    "round_to": ("--round-to", "the structured mask (--unstructured zeroes single weights)"),
    "beta": ("--beta", "--loss pw"),
    "gamma": ("--gamma", "--loss pw"),
    "seed": ("--seed", "the Hessian trace estimate (--hutchinson-samples 1 or more)"),
}


# --------------------------------------------------------------------------------------------- helpers


def float_initializers(model: onnx.ModelProto) -> list[str]:
    return [init.name for init in model.graph.initializer if init.data_type in FLOAT_TYPES]


def _uncertain(probs: torch.Tensor, low: float = UNCERTAIN_LOW, high: float = UNCERTAIN_HIGH) -> torch.Tensor:
    top = probs.reshape(probs.shape[0], -1).max(dim=1).values
    return (top > low) & (top < high)


def uncertain_share(probs: np.ndarray | torch.Tensor, low: float = UNCERTAIN_LOW, high: float = UNCERTAIN_HIGH) -> float | None:
    """Share of rows whose top-class probability lies in the open interval (low, high); None for no rows.

    Iofinova et al. (CVPR 2023) find that pruning flips these rows first, so a group with many of them is at risk.
    """
    p = torch.as_tensor(probs)
    if p.shape[0] == 0:
        return None
    return float(_uncertain(p, low, high).double().mean())


def probabilities(out: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits, read as the losses read them (one column is a binary logit)."""
    from onnxfair.losses import as_class_logits

    return torch.softmax(as_class_logits(out), dim=1)


def rank_groups(groups: dict[str, dict]) -> list[str]:
    """Labels of groups with rows, most expected harm first (see module docstring for ties)."""
    rows = [(label, g) for label, g in groups.items() if g.get("n") and g.get("predicted_loss_change") is not None]
    rows.sort(key=lambda t: (-t[1]["predicted_loss_change"], -(t[1].get("grad_norm") or 0.0), t[0]))
    return [label for label, _ in rows]


# ---------------------------------------------------------------------------------------------- masks


def magnitude_masks(
    model: onnx.ModelProto,
    cfg: RiskConfig,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The magnitude-pruning mask whose risk is assessed: (dense model the masks refer to, masks).

    Scores from `onnxfair.importance` (criterion magnitude), selection from `onnxfair.select` with the
    config's sparsity, scope and round_to, as `onnxfair prune --method magnitude` selects. Structured:
    channel groups of the graph analysis, consumer-side masks of the kept channels
    (`onnxfair.graph.channel_masks`); the dense model is the analysed model. Unstructured: per-weight
    masks over the Conv/ConvTranspose/Gemm/MatMul weights of the model itself.
    """
    from onnxfair.importance import compute_scores
    from onnxfair.interpret import OnnxModule
    from onnxfair.prune import NO_UNSTRUCTURED_WEIGHTS, kept_channels, round_to_note, sparsity_miss_note, unstructured_view, weight_names
    from onnxfair.select import select_channels, select_weights

    if cfg.sparsity == 0:
        return model, {}  # nothing removed: the mask-free figures alone
    say = progress or (lambda _m: None)
    if cfg.structured:
        from onnxfair.graph import analyze, channel_masks

        an = analyze(model, input_shapes=input_shapes or None)
        if not an.groups:
            from onnxfair.prune import no_channel_groups

            raise no_channel_groups(model, an)
        dense = an.model
        scores = compute_scores("magnitude", OnnxModule(dense), groups=an.groups, weights=weight_names(dense),
                                device="cpu", progress=say)
        keep = select_channels(scores, an.groups, sparsity=cfg.sparsity, scope=cfg.scope, round_to=cfg.round_to)
        for note in (round_to_note(an.groups, cfg.round_to), sparsity_miss_note(cfg, kept_channels(an.groups, keep))):
            if note:
                say(note)  # as prune warns: the mask assessed is not quite the one asked for
        masks = channel_masks(an, keep)
    else:
        dense = unstructured_view(model)  # as prune masks them
        names = weight_names(dense)
        if not names:
            raise UsageError(NO_UNSTRUCTURED_WEIGHTS)
        scores = compute_scores("magnitude", OnnxModule(dense), weights=names, device="cpu", progress=say)
        masks = select_weights(scores, cfg.sparsity, scope=cfg.scope)
    return dense, {k: np.asarray(v, dtype=np.float32) for k, v in masks.items()}


# ------------------------------------------------------------------------------------------ computation


def _loss_vector(out: torch.Tensor, y: torch.Tensor, cfg: RiskConfig, dense_probs: torch.Tensor | None) -> torch.Tensor:
    from onnxfair.losses import loss_fn

    return loss_fn(out, y, dense_probs=dense_probs, kind=cfg.loss, beta=cfg.beta, gamma=cfg.gamma, reduction="none")


def _rademacher(like: Sequence[torch.Tensor], seed: int, k: int) -> list[torch.Tensor]:
    """The k-th Rademacher vector (one ±1 tensor per parameter, its shape, dtype and device).

    Drawn on the CPU from a generator seeded by (seed, k) alone, so the vectors are the same on every
    device, for every group and every batch.
    """
    # (seed, k) hashed into one 63-bit seed: a modulo folded seed 2**63-1 onto seed 0
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1, np.uint64)[0] >> 1))
    return [(torch.randint(0, 2, tuple(t.shape), generator=gen, dtype=torch.int8) * 2 - 1).to(device=t.device, dtype=t.dtype)
            for t in like]


def _dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor]) -> torch.Tensor:
    total = None
    for x, y in zip(a, b):
        if x is None:
            continue
        term = (x * y).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def _second_backward(gv: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool) -> tuple:
    """Hessian-vector product: the gradient of g·v. Some torch kernels have no second derivative."""
    try:
        return torch.autograd.grad(gv, params, retain_graph=retain_graph, allow_unused=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "not implemented" in first and "derivative" in first:
            raise UnsupportedError(
                f"the Hessian-vector products need second derivatives, and torch has none for a kernel this model "
                f"uses ({first}); the interpreter must express that op with twice-differentiable functions"
            ) from None
        raise


def assess_risk(
    model: onnx.ModelProto,
    ds: GroupedDataset,
    masks: dict[str, np.ndarray],
    cfg: RiskConfig | None = None,
    progress: Progress | None = None,
) -> dict:
    """Per-group risk figures of applying `masks` to `model` (whose initializer names the masks use).

    Returns {"groups": {label: {...}}, "overall": {...}, "ranking": [...], "sparsity", "settings"}.
    """
    from onnxfair.interpret import OnnxModule

    cfg = cfg or RiskConfig()
    cfg.check()
    say = progress or (lambda _m: None)
    device = torch_device(cfg.device)
    mod = OnnxModule(logit_view(model))  # the losses need logits, not a final Softmax's probabilities
    mod.to(device)
    mod.eval()
    params = dict(mod.params)
    unknown = [name for name in masks if name not in params]
    if unknown:
        raise UsageError(f"masks name initializers that are not float parameters of the model: {', '.join(unknown[:5])}")

    # P: the parameter set of the gradient norm and the Hessian trace; S: what delta touches.
    from onnxfair.prune import weight_names

    base = weight_names(model) if cfg.params == "weights" else float_initializers(model)
    p_names = [n for n in base if n in params]
    for name in masks:
        if name not in p_names:
            p_names.append(name)
    s_names = [n for n in masks if np.any(np.asarray(masks[n]) != 1)]
    if not p_names:
        raise UsageError("the model has no prunable weights (Conv/Gemm/MatMul with initializer weights); try --params all")
    for p in params.values():
        p.requires_grad_(False)
    p_params = [params[n] for n in p_names]
    s_params = [params[n] for n in s_names]
    s_index = [p_names.index(n) for n in s_names]  # S is inside P: P holds every tensor a mask touches
    for p in p_params:
        p.requires_grad_(True)
    # delta = masked - dense = -w where the mask is 0 (fractional masks give -(1-m) w)
    deltas = [
        (torch.as_tensor(np.asarray(masks[n]), dtype=params[n].dtype, device=device) - 1.0) * params[n].detach()
        for n in s_names
    ]
    torch_masks = {n: torch.as_tensor(np.asarray(m), device=device) for n, m in masks.items()}
    p_shapes = [p.shape for p in p_params]
    k_samples = cfg.hutchinson_samples
    n_removed = int(sum(int((np.asarray(m) == 0).sum()) for m in masks.values()))

    groups: dict[str, dict] = {}
    overall_grad = [torch.zeros(s, dtype=torch.float64, device=device) for s in p_shapes]
    totals = {"n": 0, "correct": 0, "loss": 0.0, "loss_masked": 0.0, "correct_masked": 0, "uncertain": 0}
    overall_quad = np.zeros(k_samples)
    overall_pred = 0.0
    for g, label in enumerate(ds.group_labels):
        rows = np.flatnonzero(ds.group_ids == g)
        n = int(rows.size)
        if n == 0:
            groups[label] = {"n": 0, "accuracy": None, "mean_loss": None, "grad_norm": None, "hessian_trace": None,
                             "hessian_trace_stderr": None, "uncertain_share": None, "predicted_loss_change": None,
                             "measured_loss_change": None, "gradient_term": None, "curvature_term": None,
                             "measured_accuracy_change": None, "small": True}
            continue
        say(f"risk: group {label} ({n} rows)")
        grad = [torch.zeros(s, dtype=torch.float64, device=device) for s in p_shapes]
        quad = np.zeros(k_samples)
        d_quad = 0.0
        loss_sum = loss_m_sum = 0.0
        correct = correct_m = uncertain = 0
        for inputs, y, _ in ds.subset(rows).batches(cfg.batch_size):
            feed = {k: torch.as_tensor(v, device=device) for k, v in inputs.items()}
            yt = torch.as_tensor(y, device=device)
            mod.set_masks(None)
            out = checked_output(mod, feed)
            if not bool(torch.isfinite(out).all()):
                _refuse_nonfinite(mod, ds, cfg.batch_size, device)
            probs = probabilities(out.detach())
            dense_probs = probs if cfg.loss == "pw" else None
            lvec = _loss_vector(out, yt, cfg, dense_probs)
            loss_sum += float(lvec.detach().double().sum())
            pred = probs.argmax(dim=1)
            correct += int((pred == yt).sum())
            uncertain += int(_uncertain(probs).sum())
            total = lvec.sum()
            jobs: list[tuple[str, int, list[torch.Tensor]]] = []
            for k in range(k_samples):
                jobs.append(("hutchinson", k, _rademacher(p_params, cfg.seed, k)))
            if deltas:
                jobs.append(("delta", -1, deltas))
            gp = list(torch.autograd.grad(total, p_params, create_graph=bool(jobs), allow_unused=True))
            gs = [gp[i] for i in s_index]
            for acc, gr in zip(grad, gp):
                if gr is not None:
                    acc += gr.detach().double()
            for j, (kind, k, vec) in enumerate(jobs):
                grads_v, params_v = (gp, p_params) if kind == "hutchinson" else (gs, s_params)
                gv = _dot(grads_v, vec)
                if not gv.requires_grad:
                    continue  # the loss is linear in these parameters: vHv = 0
                hv = _second_backward(gv, params_v, retain_graph=j < len(jobs) - 1)
                value = float(_dot(hv, vec).double())
                if kind == "hutchinson":
                    quad[k] += value
                else:
                    d_quad += value
            del gp, gs, total, lvec, out
            with torch.no_grad():
                mod.set_masks(torch_masks)
                out_m = batch_output(mod(**feed), len(y))
                mod.set_masks(None)
                lvec_m = _loss_vector(out_m, yt, cfg, dense_probs)
                loss_m_sum += float(lvec_m.double().sum())
                correct_m += int((probabilities(out_m).argmax(dim=1) == yt).sum())
        grad = [a / n for a in grad]
        grad_term = float(sum(float((grad[i] * d.double()).sum()) for i, d in zip(s_index, deltas)))
        curv_term = 0.5 * d_quad / n
        traces = quad / n if k_samples else None
        groups[label] = {
            "n": n,
            "accuracy": correct / n,
            "mean_loss": loss_sum / n,
            "grad_norm": math.sqrt(sum(float((a * a).sum()) for a in grad)),
            "hessian_trace": float(traces.mean()) if k_samples else None,
            "hessian_trace_stderr": float(traces.std(ddof=1) / math.sqrt(k_samples)) if k_samples > 1 else None,
            "uncertain_share": uncertain / n,
            "predicted_loss_change": grad_term + curv_term,
            "measured_loss_change": (loss_m_sum - loss_sum) / n,
            "gradient_term": grad_term,
            "curvature_term": curv_term,
            "measured_accuracy_change": (correct_m - correct) / n,
            "small": n < SMALL_GROUP,
        }
        for acc, a in zip(overall_grad, grad):
            acc += a * n
        overall_quad += quad
        overall_pred += (grad_term + curv_term) * n
        for key, val in (("n", n), ("correct", correct), ("loss", loss_sum), ("loss_masked", loss_m_sum),
                         ("correct_masked", correct_m), ("uncertain", uncertain)):
            totals[key] += val
    mod.set_masks(None)
    big_n = totals["n"]
    overall = {
        "n": big_n,
        "accuracy": totals["correct"] / big_n if big_n else None,
        "mean_loss": totals["loss"] / big_n if big_n else None,
        "grad_norm": math.sqrt(sum(float(((a / big_n) ** 2).sum()) for a in overall_grad)) if big_n else None,
        "hessian_trace": float((overall_quad / big_n).mean()) if big_n and k_samples else None,
        "uncertain_share": totals["uncertain"] / big_n if big_n else None,
        "predicted_loss_change": overall_pred / big_n if big_n else None,
        "measured_loss_change": (totals["loss_masked"] - totals["loss"]) / big_n if big_n else None,
        "measured_accuracy_change": (totals["correct_masked"] - totals["correct"]) / big_n if big_n else None,
    }
    settings = asdict(cfg)
    settings.update({
        "device": str(device),
        "param_count": int(sum(p.numel() for p in p_params)),
        "param_tensors": len(p_params),
        "masked_tensors": len(s_names),
        "removed_weights": n_removed,
        "conventions": CONVENTIONS,
        "torch": torch.__version__,
    })
    return {
        "groups": groups,
        "overall": overall,
        "ranking": rank_groups(groups),
        "sparsity": cfg.sparsity,
        "settings": settings,
    }


def risk_report(
    model: onnx.ModelProto,
    ds: GroupedDataset,
    cfg: RiskConfig | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    progress: Progress | None = None,
) -> dict:
    """End to end: the magnitude mask at cfg.sparsity, then its per-group risk (see assess_risk), with the
    scored output named, the warnings given (a mask that misses the sparsity, say) and any figure that
    overflowed as None (JSON has no NaN)."""
    cfg = cfg or RiskConfig()
    cfg.check()
    warnings: list[str] = []
    with collecting_warnings(warnings):
        say = keeping_warnings(progress or (lambda _m: None), warnings)
        say(f"risk: {'structured' if cfg.structured else 'unstructured'} magnitude mask at sparsity {cfg.sparsity}")
        note = several_outputs_note(model)
        if note:
            warn_once(note)
        if cfg.structured and cfg.sparsity > 0:  # only the channel analysis needs static dims
            input_shapes = shapes_from_rows(model, input_shapes, [ds], say)
        dense, masks = magnitude_masks(model, cfg, input_shapes, say)
        report = assess_risk(dense, ds, masks, cfg, progress)
    return json_safe({**report, "output": scored_output(model), "warnings": warnings})


def _refuse_nonfinite(mod, ds: GroupedDataset, batch_size: int, device) -> None:
    """A NaN or infinite dense output makes every figure NaN: refuse, saying in how many rows (one more pass)."""
    from onnxfair.evaluate import check_scores

    with torch.no_grad():
        outs = [batch_output(mod(**{k: torch.as_tensor(v, device=device) for k, v in inputs.items()}), len(y))
                for inputs, y, _ in ds.batches(batch_size)]
    check_scores(torch.cat([o.reshape(o.shape[0], -1) for o in outs]).double().cpu().numpy())


# -------------------------------------------------------------------------------------------- rendering


def format_risk(report: dict) -> str:
    """The per-group table in ranking order, then groups without rows, then the overall row."""
    s = report["settings"]
    mode = "structured" if s.get("structured") else "unstructured"
    w = max([30] + [len(label) + 1 for label in report["groups"]])  # whole labels: cut ones can read alike
    head = (f"{'rank':>4}  {'group':<{w}}{'n':>7}{'acc%':>8}{'loss':>8}{'|grad|':>9}{'tr(H)':>10}"
            f"{'uncert%':>9}{'pred dL':>10}{'meas dL':>10}")
    lines = [
        f"bias-risk pre-check: {mode} magnitude mask at sparsity {report['sparsity']}, loss {s.get('loss')}, "
        f"params {s.get('params')} ({s.get('param_count')} values), Hutchinson K={s.get('hutchinson_samples')} seed {s.get('seed')}",
        head,
        "-" * len(head),
    ]

    def row(rank: str, label: str, g: dict) -> str:
        acc = None if g.get("accuracy") is None else 100 * g["accuracy"]
        unc = None if g.get("uncertain_share") is None else 100 * g["uncertain_share"]
        return (f"{rank:>4}  {label:<{w}}{g['n']:>7}{_cell(acc, '.2f', 8)}{_cell(g.get('mean_loss'), '.4f', 8)}"
                f"{_cell(g.get('grad_norm'), '.4f', 9)}{_cell(g.get('hessian_trace'), '.4g', 10)}{_cell(unc, '.1f', 9)}"
                f"{_cell(g.get('predicted_loss_change'), '+.4f', 10)}{_cell(g.get('measured_loss_change'), '+.4f', 10)}"
                + ("  (small group)" if g.get("small") else ""))

    for i, label in enumerate(report["ranking"], 1):
        lines.append(row(str(i), label, report["groups"][label]))
    for label, g in report["groups"].items():
        if label not in report["ranking"]:
            lines.append(row("-", label, g))
    if report.get("overall"):
        lines.append(row("", "overall", report["overall"]))
    lines.append("")
    lines.append("rank 1 = largest predicted loss increase (most expected harm); pred dL = g'd + d'Hd/2, meas dL = masked - dense")
    return "\n".join(lines)


def _cell(value: float | None, spec: str, width: int) -> str:
    """`value` right-aligned in `width` with at least one space before it: in fewer significant digits when
    the fixed-point form would run into the previous column (a diverging model's loss of 1e37)."""
    if value is None:
        return f"{'-':>{width}}"
    sign = "+" if spec.startswith("+") else ""
    for s in (spec, f"{sign}.3g", f"{sign}.2g", f"{sign}.1g"):
        text = format(value, s)
        if len(text) < width:
            return f"{text:>{width}}"
    return f" {text}"
