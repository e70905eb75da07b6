"""Turn an ONNX graph into an execution plan: parameters, constants and a list of kernel calls.

The plan is what `OnnxModule` runs. Building it checks every node against the op registry (refusals are
collected, never raised one at a time), folds nodes whose inputs are all constants (shape arithmetic,
Constant nodes), and drops nodes that no graph output depends on.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import onnx
import torch

from onnxfair.errors import ModelError
from onnxfair.interpret.spec import (
    DEFAULT_DOMAINS,
    REGISTRY,
    Kernel,
    NodeSpec,
    OpRefused,
    sparse_to_dense,
    tensor_from_proto,
)
from onnxfair.model import FLOAT_TYPES

import onnxfair.interpret.ops  # noqa: F401  (fills the registry)

# Float inputs that only steer an op (sizes, scales, bounds of a Range): an initializer used nowhere else
# is a constant, not a trainable parameter.
NON_DIFFERENTIABLE_INPUTS: dict[str, set[int]] = {
    "Resize": {1, 2, 3},
    "Range": {0, 1, 2},
    "Pad": {2},
    "Dropout": {1},
}


@dataclass
class Step:
    """One kernel call: inputs are value names ('' for absent or build-time-consumed inputs)."""

    fn: Kernel
    inputs: list[str]
    outputs: list[str]
    node: onnx.NodeProto


@dataclass
class Plan:
    opset: int
    input_names: list[str]
    output_names: list[str]
    params: dict[str, torch.Tensor]
    param_types: dict[str, int]
    param_sparse: set[str]
    consts: dict[str, torch.Tensor]
    steps: list[Step]
    refusals: Counter = field(default_factory=Counter)


MIN_OPSET = 7  # before 7, binary ops broadcast by `axis`/`broadcast` attributes and several ops differ


def default_opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in DEFAULT_DOMAINS:
            return int(o.version)
    if any(n.domain in DEFAULT_DOMAINS for n in model.graph.node):
        raise ModelError("the model uses default-domain ops but imports no default opset; re-export it")
    return None  # only custom domains: every node is refused anyway


def _topo_order(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable with respect to the file order (usually already sorted)."""
    producers: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        for o in n.output:
            if o:
                producers[o] = i
    waiting: dict[int, int] = {}
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    for i, n in enumerate(graph.node):
        deps = set()
        for name in n.input:
            if not name or name in known:
                continue
            if name not in producers:
                raise ModelError(f"node {n.name or n.op_type!r} reads {name!r}, which nothing produces; the graph is malformed")
            deps.add(producers[name])
        waiting[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i in range(len(graph.node)) if waiting[i] == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        raise ModelError("the graph has a cycle; it is not a valid ONNX model")
    return [graph.node[i] for i in order]


def _refusal_key(node: onnx.NodeProto) -> str | None:
    if node.domain not in DEFAULT_DOMAINS:
        return f"{node.domain}.{node.op_type}"
    if node.op_type not in REGISTRY:
        return node.op_type
    return None


def outer_references(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from its enclosing scopes: read by its nodes (or theirs, nested) and neither
    produced there nor among its inputs and initializers. In first-use order."""
    local = {vi.name for vi in graph.input} | {i.name for i in graph.initializer}
    local |= {sp.values.name for sp in graph.sparse_initializer}
    found: list[str] = []
    for n in graph.node:
        reads = list(n.input)
        for a in n.attribute:
            sub = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in sub:
                reads += outer_references(g)
        for x in reads:
            if x and x not in local and x not in found:
                found.append(x)
        local.update(o for o in n.output if o)
    return found


def with_captures(graph: onnx.GraphProto) -> onnx.GraphProto:
    """The graph's nodes (only), each If reading the outer values its branches use as extra inputs after its
    condition, so that ordering, liveness and the executor see those dependencies."""
    g = onnx.GraphProto()
    for n in graph.node:
        if n.op_type == "If" and n.domain in DEFAULT_DOMAINS:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            branches = [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
            m.input.extend(dict.fromkeys(x for b in branches for x in outer_references(b)))
            n = m
        g.node.append(n)
    return g


def build_plan(model: onnx.ModelProto) -> Plan:
    """Check and prepare a graph; `plan.refusals` counts what cannot be interpreted faithfully."""
    graph = model.graph
    nodes = with_captures(graph)
    opset = default_opset(model) or MIN_OPSET
    refusals: Counter = Counter()
    if opset < MIN_OPSET:
        refusals[f"opset {opset} (below {MIN_OPSET})"] += 1

    # initializers
    raw: dict[str, torch.Tensor] = {}
    types: dict[str, int] = {}
    sparse: set[str] = set()
    for init in graph.initializer:
        try:
            raw[init.name] = tensor_from_proto(init)
        except OpRefused as exc:
            refusals[f"initializer {exc.key}"] += 1
            continue
        types[init.name] = init.data_type
    for sp in graph.sparse_initializer:
        name = sp.values.name
        try:
            raw[name] = sparse_to_dense(sp)
        except OpRefused as exc:
            refusals[f"initializer {exc.key}"] += 1
            continue
        types[name] = sp.values.data_type
        sparse.add(name)

    input_names = [vi.name for vi in graph.input if vi.name not in raw and vi.name not in types]
    output_names = [vi.name for vi in graph.output]

    # which float initializers are trainable: any use outside a steering input
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in nodes.node:
        for j, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node.op_type, j))
    params: dict[str, torch.Tensor] = {}
    consts: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if types[name] in FLOAT_TYPES:
            u = uses.get(name, [])
            steering = u and all(j in NON_DIFFERENTIABLE_INPUTS.get(op, ()) for op, j in u)
            if not steering or name in output_names:
                params[name] = t
                continue
        consts[name] = t
    shapes = {name: tuple(t.shape) for name, t in raw.items()}

    known = set(raw) | set(input_names)
    order = _topo_order(nodes, known)

    steps: list[Step] = []
    for node in order:
        key = _refusal_key(node)
        if key is not None:
            refusals[key] += 1
            continue
        try:
            spec = NodeSpec(node, opset, consts, shapes)
            fn = REGISTRY[node.op_type](spec)
        except OpRefused as exc:
            refusals[exc.key] += 1
            continue
        ins = [name if (name and j not in spec.static_inputs) else "" for j, name in enumerate(node.input)]
        outs = list(spec.outputs)
        if all(not n or n in consts for n in node.input):
            try:
                _fold(spec, fn, ins, outs, consts, shapes)
            except OpRefused as exc:
                refusals[exc.key] += 1
            continue
        steps.append(Step(fn, ins, outs, node))

    steps = _prune_dead(steps, output_names)
    needed = {n for s in steps for n in s.inputs if n} | set(output_names)
    consts = {k: v for k, v in consts.items() if k in needed}
    return Plan(opset, input_names, output_names, params, {k: types[k] for k in params}, sparse & set(params),
                consts, steps, refusals)


def _fold(spec: NodeSpec, fn: Kernel, ins: list[str], outs: list[str], consts: dict, shapes: dict) -> None:
    args = [consts[n] if n else None for n in ins]
    try:
        with torch.no_grad():
            r = fn(*args)
    except (OpRefused, ModelError):
        raise
    except Exception as exc:
        raise ModelError(
            f"{spec.op_type} node {spec.name!r} fails on its constant inputs ({type(exc).__name__}: {exc}); "
            "the graph is malformed"
        ) from None
    results = [r] if len(outs) == 1 else list(r)[: len(outs)]
    for name, v in zip(outs, results):
        if name:
            if not isinstance(v, torch.Tensor):
                v = torch.as_tensor(v)
            consts[name] = v
            shapes[name] = tuple(v.shape)


def _prune_dead(steps: list[Step], outputs: list[str]) -> list[Step]:
    live = set(outputs)
    kept: list[Step] = []
    for s in reversed(steps):
        if any(o in live for o in s.outputs if o):
            kept.append(s)
            live.update(n for n in s.inputs if n)
    kept.reverse()
    return kept


# refusals an export setting avoids, and that setting: (what the refusal's key starts with, the fix)
_EXPORT_FIXES = (
    (("RMSNormalization", "Attention", "RotaryEmbedding"),
     "export at opset 22 or lower (torch.onnx.export(..., opset_version=18), say), which writes {op} as basic ops"),
    (("BatchNormalization(training_mode", "Dropout(training_mode"),
     "export the model in eval mode (model.eval() before torch.onnx.export)"),
)


def refusal_message(refusals: Counter) -> str:
    parts = ", ".join(f"{k} x{v}" for k, v in sorted(refusals.items(), key=lambda kv: (-kv[1], kv[0])))
    fixes, covered = [], set()
    for starts, fix in _EXPORT_FIXES:
        hit = sorted(k for k in refusals if k.startswith(starts))
        if hit:
            covered.update(hit)
            fixes.append(fix.format(op=" and ".join(dict.fromkeys(k.split("(")[0] for k in hit))))
    if len(covered) < len(refusals):
        fixes.append(f"re-export {'the rest' if covered else 'it'} with them expressed through supported ops")
    fix = "; ".join(fixes)
    return (f"unsupported ops: {parts}; onnxfair cannot interpret these faithfully, so it refuses the model: "
            f"{fix} (`onnxfair inspect MODEL` lists what is left)")
