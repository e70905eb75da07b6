"""Statistics repair: renormalise pruned layers' output channels to the dense model's statistics.

Exported CNNs have BatchNorm folded into their convolutions, so nothing re-centres or re-scales the
activations once weights are removed: each pruned layer's outputs shrink and shift, the next layers see
inputs they were not trained for, and the error compounds (on the digits ResNet, magnitude pruning of 70 %
of each layer's weights leaves 17 % accuracy). The repair is the post-training analogue of re-estimating
BatchNorm statistics (as REPAIR, Jordan et al. 2023, does for interpolated networks): for each Conv or
Gemm in graph order, measure every output channel's mean μ and standard deviation σ over the calibration
rows in the dense model and in the pruned one (with the layers before it already repaired), then scale the
channel's weights by s = σ_dense / σ_pruned and set its bias so the mean is μ_dense. No gradients: per
layer, a pass over --data through the part of the graph up to that layer (and one through the dense model,
kept for later steps); removed weights stay zero.

Fairness: the statistics are averages over rows, so the majority group would set them. With ``balanced``
(`--repair balanced`) every group's rows weigh the same in the averages (each group 1/K), so the repaired
channels match the dense model on the minority's inputs as much as on the majority's. ``plain`` weighs
rows equally. A channel whose pruned output is nearly constant (σ_pruned below σ_dense / 1000, e.g. every
weight of it removed) is only re-centred. Layers whose output channels cannot be rescaled exactly (no bias
initializer of their own, a weight or bias shared with another node, a Gemm with transA) are left as they
are and listed in the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping

import numpy as np
import onnx
import torch
from onnx import helper

from onnxfair.data import GroupedDataset
from onnxfair.errors import ModelError

__all__ = ["repair_statistics", "repairable_layers"]

_MAX_SCALE = 1e3  # a channel pruning left (nearly) constant is re-centred, not blown up by a larger factor


@dataclass(frozen=True)
class _Layer:
    node: str
    output: str
    weight: str
    bias: str
    out_axis: int  # the weight's axis holding output channels
    bias_scale: float  # Gemm's beta (the bias enters as beta * C); 1 for Conv


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def repairable_layers(model: onnx.ModelProto) -> tuple[list[_Layer], list[dict]]:
    """Conv and Gemm nodes (graph order) whose output channels can be rescaled exactly, and the skipped ones."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    layers, skipped = [], []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        name = n.name or n.output[0]
        if n.op_type in ("MatMul", "ConvTranspose") and any(i in inits for i in n.input):
            skipped.append({"node": name, "reason": f"{n.op_type} is not repaired (Conv and Gemm are)"})
            continue
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w = n.input[1] if len(n.input) > 1 else ""
        b = n.input[2] if len(n.input) > 2 else ""
        reason = None
        if w not in inits or b not in inits:
            reason = "no weight and bias initializers of its own"
        elif uses.get(w, 0) > 1 or uses.get(b, 0) > 1:
            reason = "weight or bias shared with another node"
        elif n.op_type == "Gemm" and _attr(n, "transA", 0):
            reason = "Gemm with transA"
        elif n.op_type == "Gemm" and (list(inits[b].dims) != [inits[w].dims[0 if _attr(n, "transB", 0) else 1]]
                                      or float(_attr(n, "beta", 1.0)) == 0.0):
            reason = "Gemm bias is not one value per output (broadcast or absent)"
        elif n.op_type == "Conv" and list(inits[b].dims) != [inits[w].dims[0]]:
            reason = "Conv bias is not one value per output channel"
        if reason:
            skipped.append({"node": name, "reason": reason})
            continue
        if n.op_type == "Conv":
            layers.append(_Layer(name, n.output[0], w, b, 0, 1.0))
        else:
            layers.append(_Layer(name, n.output[0], w, b, 0 if _attr(n, "transB", 0) else 1, float(_attr(n, "beta", 1.0))))
    return layers, skipped


def _downstream_of_masks(model: onnx.ModelProto, masks: Mapping[str, np.ndarray]) -> set[str]:
    """Names of the values that depend on a masked initializer (the nodes reading one, and everything after)."""
    reached: set[str] = set()
    changed = True
    while changed:  # a fixpoint, so the walk does not rely on the nodes being listed in order
        changed = False
        for n in model.graph.node:
            if any(i in masks or i in reached for i in n.input) and not all(o in reached for o in n.output if o):
                reached.update(o for o in n.output if o)
                changed = True
    return reached


def _row_weights(ds: GroupedDataset, balanced: bool) -> np.ndarray:
    """Per-row weights summing to 1: each group's rows share 1/K when balanced, else every row 1/N."""
    w = np.full(len(ds), 1.0 / max(len(ds), 1))
    if balanced:
        present = np.unique(ds.group_ids)
        for g in present:
            rows = ds.group_ids == g
            w[rows] = 1.0 / (present.size * rows.sum())
    return w


def _channel_moments(values: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-channel sums of x and x² (channels on axis 1; other axes averaged within a row)."""
    v = values.double()
    if v.ndim > 2:
        flat = v.reshape(v.shape[0], v.shape[1], -1)
        m1, m2 = flat.mean(2), (flat * flat).mean(2)
    else:
        m1, m2 = v, v * v
    return (w[:, None] * m1).sum(0), (w[:, None] * m2).sum(0)


def _probe(model: onnx.ModelProto, output: str):
    """An interpreter of just the part of `model` that computes `output`, returning it: the nodes after it
    are never run, so a probe costs at most one forward pass and holds no more memory than one."""
    from onnxfair.interpret import OnnxModule
    from onnxfair.interpret.compile import outer_references

    needed, nodes = {output}, []
    for n in reversed(model.graph.node):
        if any(o in needed for o in n.output):
            nodes.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:  # subgraphs (If, Loop) read outer values too, at any depth
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    needed.update(outer_references(g))
    graph = helper.make_graph(
        list(reversed(nodes)), f"{model.graph.name}_probe", list(model.graph.input),
        [helper.make_tensor_value_info(output, onnx.TensorProto.UNDEFINED, None)],
        [t for t in model.graph.initializer if t.name in needed],
        sparse_initializer=[t for t in model.graph.sparse_initializer if t.values.name in needed],
    )
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    return OnnxModule(probe)


def _statistics(mod, ds: GroupedDataset, w: np.ndarray, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Weighted per-channel mean and standard deviation of the probe's output over `ds`."""
    from onnxfair.finetune import to_tensors

    sums = None
    start = 0
    with torch.no_grad():
        for inputs, y, _g in ds.batches(batch_size):
            rows = len(y)
            wb = torch.from_numpy(w[start : start + rows]).to(device)
            start += rows
            out = mod(**to_tensors(inputs, device))
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.shape[0] != rows:
                raise _NotPerRow()
            m1, m2 = _channel_moments(out, wb)
            sums = [m1, m2] if sums is None else [sums[0] + m1, sums[1] + m2]
    m1, m2 = (t.cpu().numpy() for t in sums)
    if not (np.isfinite(m1).all() and np.isfinite(m2).all()):
        raise ModelError("--repair: a layer's statistics are not finite (overflow in the model's precision?); "
                         "run without --repair")
    return m1, np.sqrt(np.maximum(m2 - m1 * m1, 0.0))


class _NotPerRow(Exception):
    """A probed value whose first axis is not the data row (e.g. tokens flattened into it)."""


def repair_statistics(
    mod, model: onnx.ModelProto, masks: Mapping[str, np.ndarray], ds: GroupedDataset, *, balanced: bool = True,
    batch_size: int = 256, progress: Callable[[str], None] = lambda s: None,
    dense_stats: dict | None = None, fixed: Collection[str] = (),
) -> dict:
    """Renormalise, in place, the parameters of `mod` (the interpreter of `model`, pruned by `masks`, which
    stay applied) so each repairable layer a mask reaches matches the dense model's per-channel output
    statistics on `ds`. `dense_stats` (a dict, filled on first use) keeps those dense statistics between
    calls on the same model, data and mode, e.g. the steps of one iterative run. A layer whose weight or
    bias is in `fixed` (--ignore) is left untouched. Returns the report's record."""
    from onnxfair.finetune import model_device

    layers, skipped = repairable_layers(model)
    reached = _downstream_of_masks(model, masks)
    layers = [l for l in layers if l.output in reached]  # elsewhere nothing changed
    for l in [l for l in layers if l.bias in masks]:
        skipped.append({"node": l.node, "reason": "its bias is masked"})
    layers = [l for l in layers if l.bias not in masks]
    for l in [l for l in layers if l.weight in fixed or l.bias in fixed]:
        skipped.append({"node": l.node, "reason": "--ignore keeps it untouched"})
    layers = [l for l in layers if l.weight not in fixed and l.bias not in fixed]
    record = {"mode": "balanced" if balanced else "plain", "layers": len(layers), "skipped": skipped, "scales": {}}
    if not layers or len(ds) == 0:
        return record
    device = model_device(mod)
    w = _row_weights(ds, balanced)
    dense_stats = {} if dense_stats is None else dense_stats
    params = mod.params
    for k, layer in enumerate(layers):
        progress(f"  repair {k + 1}/{len(layers)}: {layer.node}")
        probe = _probe(model, layer.output).to(device)
        try:
            if layer.output not in dense_stats:  # the probe starts with the dense weights
                dense_stats[layer.output] = _statistics(probe, ds, w, batch_size, device)
            mu_d, sd_d = dense_stats[layer.output]
            with torch.no_grad():  # now the pruned ones, as the module applies them (masked; repaired so far)
                for name, p in probe.params.items():
                    p.copy_(params[name] * mod.masks[name] if name in mod.masks else params[name])
            mu_p, sd_p = _statistics(probe, ds, w, batch_size, device)
        except _NotPerRow:  # per-row weights cannot apply: leave the layer alone
            skipped.append({"node": layer.node, "reason": "its output's first axis is not the data row"})
            continue
        live = (sd_p * _MAX_SCALE > sd_d) & (sd_d > 0)  # a channel constant in the dense model is only re-centred
        scale = np.where(live, sd_d / np.where(live, sd_p, 1.0), 1.0)
        weight, bias = params[layer.weight], params[layer.bias]
        # out_c = s * (out_c - beta*b_c) + beta*b'_c with mean mu_d:  b'_c = (mu_d - s * (mu_p - beta*b_c)) / beta
        old_bias = bias.detach().double().cpu().numpy()
        new_bias = (mu_d - scale * (mu_p - layer.bias_scale * old_bias)) / layer.bias_scale
        shape = [1] * weight.ndim
        shape[layer.out_axis] = -1
        with torch.no_grad():
            weight.mul_(torch.from_numpy(scale).to(weight.device, weight.dtype).reshape(shape))
            bias.copy_(torch.from_numpy(new_bias).to(bias.device, bias.dtype))
        record["scales"][layer.node] = {"min": float(scale.min()), "median": float(np.median(scale)),
                                        "max": float(scale.max()), "constant_channels": int((~live).sum())}
    record["layers"] = len(record["scales"])
    if skipped:
        progress(f"  repair left {len(skipped)} layer(s) as they were: "
                 + "; ".join(f"{s['node']} ({s['reason']})" for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else ""))
    return record
