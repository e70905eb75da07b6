"""`analyze`: fold constants, infer shapes once, walk the per-op rules, form channel groups.

A group is a union of channel spaces that reaches no frozen use; its members are every initializer
slice that must follow the group's keep-set. Frozen unions are reported with their reasons.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from math import prod

import numpy as np
import onnx

from onnxfair.errors import ModelError
from onnxfair.graph import shapes as shp
from onnxfair.graph.channels import Layout, Spaces, channel_positions, union_layouts
from onnxfair.graph.cost import Cost, cost_and_node_macs
from onnxfair.graph.fold import fold_constants, subgraph_references
from onnxfair.graph.groups import ChannelGroup, Member
from onnxfair.graph.rules import RawMember, Walker
from onnxfair.graph.storage import to_dense_storage


@dataclass
class Analysis:
    """Result of `analyze`. `model` is the dense model the groups refer to (folded, shapes inferred)."""

    model: onnx.ModelProto
    groups: list[ChannelGroup]
    frozen: list[dict]
    cost: Cost | None = None
    input_shapes: dict | None = None
    # internal state used by the rewrite
    spaces: Spaces = field(default_factory=Spaces, repr=False)
    group_root: list[int] = field(default_factory=list, repr=False)
    fixes: list[tuple] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready summary: groups with their members and shares, frozen spaces with reasons."""
        return {
            "groups": [
                {
                    "id": g.id,
                    "name": g.name,
                    "channels": g.size,
                    "exact": g.exact,
                    "members": [{"initializer": m.initializer, "axis": m.axis, "role": m.role} for m in g.members],
                    "macs": int(g.macs),
                    "params": int(g.params),
                    "macs_share": float(g.macs_share),
                    "params_share": float(g.params_share),
                }
                for g in self.groups
            ],
            "frozen": list(self.frozen),
            "macs": int(self.cost.macs) if self.cost else None,
            "params": int(self.cost.params) if self.cost else None,
        }

    def group(self, key: int | str) -> ChannelGroup:
        """A group by id or name."""
        for g in self.groups:
            if g.id == key or g.name == key:
                return g
        raise KeyError(key)


def _prepare(model: onnx.ModelProto, input_shapes: dict | None) -> onnx.ModelProto:
    """Copy without initializer-inputs, sparse initializers densified (slicing needs dense arrays),
    constants folded, non-batch input dims fixed, shapes inferred."""
    if model.graph.sparse_initializer:
        m = to_dense_storage(model)
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    if any(vi.name in inits for vi in m.graph.input):
        real = [vi for vi in m.graph.input if vi.name not in inits]
        del m.graph.input[:]
        m.graph.input.extend(real)
    m = fold_constants(m)
    if input_shapes:
        m = shp.set_input_dims(m, input_shapes, batch=None, require_static=False)
    del m.graph.value_info[:]
    return shp.infer(m)


def _topological(model: onnx.ModelProto) -> None:
    """Refuse graphs whose nodes are not in topological order (the ONNX checker requires it)."""
    g = model.graph
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {s.values.name for s in g.sparse_initializer}
    known.add("")
    for n in g.node:
        missing = [x for x in n.input if x not in known]
        if missing:
            raise ModelError(f"node {n.name or n.op_type} reads {missing[0]!r} before it is produced; "
                             "the graph is not topologically sorted (re-export or run onnx.checker)")
        known.update(n.output)


def analyze(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
            ignore: tuple[str, ...] | list[str] = (), allow_inexact: bool = False) -> Analysis:
    """Channel groups of a model.

    `ignore`: fnmatch patterns; spaces touching a node or initializer whose name matches are frozen.
    `allow_inexact`: let LayerNormalization over the channel axis pass (groups marked exact=False,
    since removing channels changes its statistics and the pruned model then differs from the masked
    one); by default such spaces are frozen.
    """
    m = _prepare(model, input_shapes)
    _topological(m)
    dims = shp.complete_dims(m, shp.tensor_dims(m))
    w = Walker(m, dims, allow_inexact=allow_inexact, ignore=tuple(ignore))
    w.run()
    _check_shared(w)
    if ignore:
        for r in w.raw:
            for pat in ignore:
                if fnmatchcase(r.init, pat):
                    _freeze_segs(w.spaces, r.segs, f"initializer {r.init} matches ignore pattern {pat!r}")
    cost, node_macs_arr = cost_and_node_macs(m, input_shapes)
    groups, roots = _form_groups(w, cost, node_macs_arr)
    frozen = []
    seen = set()
    for root, reasons in sorted(w.spaces.frozen.items()):
        root = w.spaces.find(root)
        if root in seen:
            continue
        seen.add(root)
        frozen.append({"space": w.spaces.name[root], "channels": w.spaces.size[root], "reason": "; ".join(dict.fromkeys(reasons))})
    return Analysis(model=m, groups=groups, frozen=frozen, cost=cost, input_shapes=dict(input_shapes or {}),
                    spaces=w.spaces, group_root=roots, fixes=list(w.fixes))


def _freeze_segs(spaces: Spaces, segs: Layout, reason: str) -> None:
    for s in segs:
        if s.space is not None:
            spaces.freeze(s.space, reason)


def _check_shared(w: Walker) -> None:
    """An initializer sliced on an axis must be sliced the same way for every node that reads it."""
    uses: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for i, n in enumerate(w.nodes):
        for j, x in enumerate(n.input):
            if x in w.inits:
                uses[x].add((i, j))
    outside = subgraph_references(w.g) | {o.name for o in w.g.output}
    by_key: dict[tuple[str, int], list[RawMember]] = defaultdict(list)
    for r in w.raw:
        by_key[(r.init, r.axis)].append(r)
    for (init, axis), lst in by_key.items():
        covered = {(r.node, r.input) for r in lst}
        if init in outside:
            for r in lst:
                _freeze_segs(w.spaces, r.segs, f"initializer {init} is also read by a subgraph or is a graph output")
            continue
        if covered != uses[init]:
            for r in lst:
                _freeze_segs(w.spaces, r.segs, f"initializer {init} is shared with a use that cannot be sliced")
            continue
        first = lst[0]
        for r in lst[1:]:
            if (r.node, r.input) == (first.node, first.input):
                continue
            if not union_layouts(w.spaces, first.segs, r.segs):
                for q in lst:
                    _freeze_segs(w.spaces, q.segs, f"initializer {init} is shared by layers with different channels")
                break


def _form_groups(w: Walker, cost: Cost, node_macs_arr: np.ndarray) -> tuple[list[ChannelGroup], list[int]]:
    sp = w.spaces
    # (root, init, axis) -> per-channel position sets, plus role/node of the first registration
    table: dict[tuple[int, str, int], dict] = {}
    for r in w.raw:
        for root, runs in channel_positions(r.segs, sp).items():
            if root in sp.frozen:
                continue
            key = (root, r.init, r.axis)
            entry = table.get(key)
            if entry is None:
                entry = table[key] = {"role": r.role, "node": r.node, "runs": [], "nodes": set()}
            elif entry["role"] != "producer" and r.role == "producer":
                entry["role"], entry["node"] = "producer", r.node
            entry["runs"].extend(runs)
            entry["nodes"].add(r.node)  # a shared weight is read by several nodes: each one's MACs shrink
    by_root: dict[int, list] = defaultdict(list)
    for (root, init, axis), entry in table.items():
        by_root[root].append((init, axis, entry))
    total_macs = max(int(cost.macs), 1)
    total_params = max(int(cost.params), 1)
    groups: list[ChannelGroup] = []
    roots: list[int] = []
    for root in sorted(by_root):
        entries = by_root[root]
        if not any(e["role"] == "producer" for _, _, e in entries):
            continue
        size = sp.size[root]
        members = []
        macs_by_node: dict[int, float] = defaultdict(float)
        covered: dict[str, dict[int, int]] = defaultdict(dict)  # init -> axis -> positions the group holds
        init_dims: dict[str, tuple[int, ...]] = {}
        for init, axis, e in entries:
            idx = _index_map(size, e["runs"])
            dims = w.const_dims(init)
            npos = int((idx >= 0).sum())
            members.append(Member(initializer=init, axis=axis, indices=idx, role=e["role"], node=w.label(e["node"])))
            covered[init][axis] = npos
            init_dims[init] = tuple(dims)
            for node in e["nodes"]:
                # a node's share of this group: its weight and bias cover the same channels, so take the max
                macs_by_node[node] = max(macs_by_node[node], npos / dims[axis])
        # the entries the group's channels touch: along two axes of one weight (shared by coupled layers) the
        # union of the slices, not their sum
        params = sum(prod(init_dims[init]) - prod(d - axes.get(a, 0) for a, d in enumerate(init_dims[init]))
                     for init, axes in covered.items())
        macs = sum(min(f, 1.0) * int(node_macs_arr[n]) for n, f in macs_by_node.items())
        members.sort(key=lambda m: {"producer": 0, "param": 1, "consumer": 2}[m.role])
        gid = len(groups)
        parts = sorted(sp.parts.get(root, ()))
        groups.append(ChannelGroup(id=gid, name=sp.name[root], size=size, members=members, macs=int(round(macs)),
                                   params=int(params), macs_share=float(macs) / total_macs,
                                   params_share=float(params) / total_params, exact=root not in sp.inexact,
                                   parts=[tuple(p) for p in parts]))
        roots.append(root)
    return groups, roots


def _index_map(size: int, runs: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """[size, k] positions per channel from runs (first channel, positions [length, block]); -1 pads."""
    count = np.zeros(size, dtype=np.int64)
    for start, pos in runs:
        count[start:start + pos.shape[0]] += 1
    blocks = {pos.shape[1] for _, pos in runs}
    if count.max() <= 1 and len(blocks) == 1:
        k = blocks.pop()
        idx = np.full((size, k), -1, dtype=np.int64)
        for start, pos in runs:
            idx[start:start + pos.shape[0]] = pos
        return idx
    chan: dict[int, set[int]] = defaultdict(set)
    for start, pos in runs:
        for c in range(pos.shape[0]):
            chan[start + c].update(int(p) for p in pos[c])
    k = max(len(v) for v in chan.values())
    idx = np.full((size, k), -1, dtype=np.int64)
    for c, ps in chan.items():
        row = sorted(ps)
        idx[c, : len(row)] = row
    return idx
