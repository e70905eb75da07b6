"""Structured rewrite (channels physically removed), consumer-side channel masks, unstructured masks.

`prune_channels` slices every member initializer with its group's keep-set and fixes what encodes a
channel count elsewhere: depthwise Conv `group`, Split sizes, Slice bounds, Reshape/Expand/Resize
constants, and the axes of a Squeeze that had none (it would drop a channel axis pruned to one). Stale
value_info is dropped and shapes re-inferred once. The masked dense model
(`mask_channels`: zero the consumer columns of removed channels) is the oracle: both give the same
outputs in onnxruntime, because every path of a removed channel ends at a consumer or was frozen.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxfair.errors import UsageError
from onnxfair.graph import shapes as shp
from onnxfair.graph.analysis import Analysis
from onnxfair.graph.channels import Layout, sub_layout
from onnxfair.graph.fold import remove_unused_initializers
from onnxfair.graph.groups import Member


def round_keep(n_keep: int, size: int, round_to: int = 1) -> int:
    """Channel count to keep: nearest multiple of round_to (ties up), never 0, never above size.

    Groups no larger than round_to keep n_keep itself (clamped to [1, size]); asking for every channel
    keeps every channel; a rounded result above size is clamped to size.
    """
    size = int(size)
    n = int(min(max(int(round(n_keep)), 1), size))
    if round_to is None or round_to <= 1 or size <= round_to or n >= size:
        return n
    r = int(np.floor(n / round_to + 0.5)) * round_to
    r = max(r, round_to)
    return min(r, size)


def _validate_keep(an: Analysis, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """keep by root space id; every group absent from keep keeps all its channels."""
    by_root: dict[int, np.ndarray] = {}
    ids = {g.id: g for g in an.groups}
    for gid, k in (keep or {}).items():
        if gid not in ids:
            raise UsageError(f"keep names channel group {gid!r}, which does not exist (groups 0..{len(ids) - 1})")
        g = ids[gid]
        arr = np.unique(np.asarray(k, dtype=np.int64).reshape(-1))
        if arr.size == 0:
            raise UsageError(f"channel group {g.name} would keep 0 channels; keep at least one")
        if arr[0] < 0 or arr[-1] >= g.size:
            raise UsageError(f"keep for channel group {g.name} has indices outside 0..{g.size - 1}")
        for lo, hi in g.parts:
            if not np.any((arr >= lo) & (arr < hi)):
                raise UsageError(f"channel group {g.name}: channels {lo}..{hi - 1} feed one Split/Slice output "
                                 "and would all be removed; keep at least one of them")
        by_root[an.group_root[gid]] = arr
    return by_root


def _new_len(an: Analysis, segs: Layout, kept: dict[int, np.ndarray]) -> int:
    n = 0
    for s in segs:
        if s.space is None:
            n += s.positions
            continue
        k = kept.get(an.spaces.find(s.space))
        if k is None:
            n += s.positions
        else:
            cnt = int(np.searchsorted(k, s.start + s.length) - np.searchsorted(k, s.start))
            n += cnt * s.block
    return n


def _removed(an: Analysis, kept: dict[int, np.ndarray], consumers_only: bool) -> Iterator[tuple[Member, np.ndarray]]:
    """(member, positions along its axis) for every member slice a removed channel occupies.

    One walk for prune_channels (all members) and channel_masks (consumers only), so the rewrite and
    its masked oracle cannot disagree on which positions a removed channel has.
    """
    for g in an.groups:
        k = kept.get(an.group_root[g.id])
        if k is None or len(k) == g.size:
            continue
        removed = np.setdiff1d(np.arange(g.size), k)
        for m in g.consumers() if consumers_only else g.members:
            pos = m.indices[removed].reshape(-1)
            pos = pos[pos >= 0]
            if pos.size:
                yield m, pos


def _removed_positions(an: Analysis, kept: dict[int, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    out: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for m, pos in _removed(an, kept, consumers_only=False):
        out[(m.initializer, m.axis)].append(pos)
    return {key: np.unique(np.concatenate(v)) for key, v in out.items()}


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _del_attr(node: onnx.NodeProto, name: str) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            return


class _Consts:
    """New per-node initializers for rewritten shape constants (never edits a shared one in place)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.names = set(self.inits) | {x for n in model.graph.node for x in list(n.input) + list(n.output)}
        self.edits: dict[tuple[int, int], np.ndarray] = {}

    def value(self, node_idx: int, input_idx: int) -> np.ndarray:
        key = (node_idx, input_idx)
        if key not in self.edits:
            name = self.model.graph.node[node_idx].input[input_idx]
            self.edits[key] = numpy_helper.to_array(self.inits[name]).copy()
        return self.edits[key]

    def set_new(self, node_idx: int, input_idx: int, arr: np.ndarray) -> None:
        self.edits[(node_idx, input_idx)] = arr

    def commit(self) -> None:
        g = self.model.graph
        for (ni, ii), arr in self.edits.items():
            node = g.node[ni]
            base = (node.input[ii] if ii < len(node.input) and node.input[ii] else node.output[0]) + "_pruned"
            name, k = base, 0
            while name in self.names:
                k += 1
                name = f"{base}_{k}"
            self.names.add(name)
            g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
            while len(node.input) <= ii:
                node.input.append("")
            node.input[ii] = name


def _apply_fixes(an: Analysis, m: onnx.ModelProto, kept: dict[int, np.ndarray]) -> None:
    consts = _Consts(m)
    nodes = m.graph.node
    for fix in an.fixes:
        kind = fix[0]
        if kind == "group":
            _, idx, segs = fix
            _set_attr(nodes[idx], "group", _new_len(an, segs, kept))
        elif kind == "reshape":
            _, (ni, ii, flat), segs = fix
            arr = consts.value(ni, ii)
            arr.reshape(-1)[flat] = _new_len(an, segs, kept)
        elif kind == "split":
            _, idx, subs, how = fix
            sizes = [_new_len(an, s, kept) for s in subs]
            node = nodes[idx]
            if min(sizes) <= 0:
                raise UsageError(f"Split {node.name or idx} would produce an output with 0 channels; keep at least "
                                 "one channel per split part")
            if how == "attr":
                _set_attr(node, "split", sizes)
            else:
                _del_attr(node, "num_outputs")
                consts.set_new(idx, 1, np.asarray(sizes, dtype=np.int64))
        elif kind == "squeeze_axes":  # the axes the dense model squeezes, never a pruned-to-one channel axis
            _, idx, axes, how = fix
            if how == "attr":
                _set_attr(nodes[idx], "axes", list(axes))
            else:
                consts.set_new(idx, 1, np.asarray(axes, dtype=np.int64))
        elif kind == "slice":
            _, idx, k, segs, lo, hi, how = fix
            node = nodes[idx]
            new_lo = _new_len(an, sub_layout(segs, 0, lo), kept) if lo > 0 else 0
            width = _new_len(an, sub_layout(segs, lo, hi), kept)
            if width <= 0:
                raise UsageError(f"Slice {node.name or idx} would produce 0 channels; keep at least one channel in "
                                 "the sliced range")
            if how == "attr":
                a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
                starts, ends = list(a["starts"]), list(a["ends"])
                starts[k], ends[k] = new_lo, new_lo + width
                _set_attr(node, "starts", starts)
                _set_attr(node, "ends", ends)
            else:
                starts, ends = consts.value(idx, 1), consts.value(idx, 2)
                starts.reshape(-1)[k] = new_lo
                ends.reshape(-1)[k] = new_lo + width
    consts.commit()


def prune_channels(an: Analysis, keep: dict[int, np.ndarray], infer_shapes: bool = True) -> onnx.ModelProto:
    """A new model with the removed channels physically gone (groups absent from keep stay whole)."""
    kept = _validate_keep(an, keep)
    m = onnx.ModelProto()
    m.CopyFrom(an.model)
    removed = _removed_positions(an, kept)
    by_init: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (init, axis), pos in removed.items():
        by_init[init].append((axis, pos))
    for init in m.graph.initializer:
        cuts = by_init.get(init.name)
        if not cuts:
            continue
        arr = numpy_helper.to_array(init)
        for axis, pos in cuts:
            arr = np.delete(arr, pos, axis=axis)
        if 0 in arr.shape and all(d > 0 for d in init.dims):
            raise UsageError(f"pruning would leave initializer {init.name} empty; keep more channels")
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))
    _apply_fixes(an, m, kept)
    del m.graph.value_info[:]
    remove_unused_initializers(m)
    if infer_shapes:
        m = shp.infer(m)
    return m


def channel_masks(an: Analysis, keep: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 0/1 masks (initializer shape) zeroing the consumer columns of removed channels."""
    kept = _validate_keep(an, keep)
    shapes = {i.name: tuple(int(d) for d in i.dims) for i in an.model.graph.initializer}
    masks: dict[str, np.ndarray] = {}
    for mb, pos in _removed(an, kept, consumers_only=True):
        mask = masks.get(mb.initializer)
        if mask is None:
            mask = masks[mb.initializer] = np.ones(shapes[mb.initializer], dtype=np.float32)
        index = [slice(None)] * mask.ndim
        index[mb.axis] = pos
        mask[tuple(index)] = 0.0
    return masks


def mask_weights(model: onnx.ModelProto, masks: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy with `initializer * mask` written (exact zeros where mask is 0); shapes must match."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    pending = dict(masks)
    for init in m.graph.initializer:
        if init.name not in pending:
            continue
        mask = np.asarray(pending.pop(init.name))
        arr = numpy_helper.to_array(init)
        if mask.shape != arr.shape:
            raise UsageError(f"mask for {init.name} has shape {mask.shape}, the initializer {arr.shape}")
        out = np.where(mask != 0, arr, np.zeros((), dtype=arr.dtype)).astype(arr.dtype, copy=False)
        init.CopyFrom(numpy_helper.from_array(out, init.name))
    if pending:
        raise UsageError(f"masks name initializers the model does not have: {', '.join(sorted(pending)[:5])}")
    return m


def mask_channels(an: Analysis, keep: dict[int, np.ndarray]) -> onnx.ModelProto:
    """The dense model with consumer-side channel masks applied: the oracle for prune_channels."""
    return mask_weights(an.model, channel_masks(an, keep))
