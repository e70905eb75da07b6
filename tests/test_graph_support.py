"""Shared builders for the graph-layer tests: small torch models, hand-built ONNX graphs, the oracle."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# ---- onnxruntime oracle ---------------------------------------------------------------------------------


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0, shapes: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if shapes and vi.name in shapes:
            shape = shapes[vi.name]
        else:
            shape = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else 4)
                     for i, d in enumerate(tt.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def random_keep(an, rng: np.random.Generator, frac: float | None = None) -> dict[int, np.ndarray]:
    """A random keep-set per group that respects Split/Slice parts (each part keeps one channel)."""
    keep = {}
    for g in an.groups:
        n = max(1, int(round(g.size * frac))) if frac is not None else int(rng.integers(1, g.size + 1))
        chosen = set(rng.choice(g.size, n, replace=False).tolist())
        for lo, hi in g.parts:
            if not any(lo <= c < hi for c in chosen):
                chosen.add(int(rng.integers(lo, hi)))
        keep[g.id] = np.array(sorted(chosen))
    return keep


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-4) -> None:
    scale = max(float(np.abs(b).max()), 1.0)
    assert np.abs(a - b).max() <= rel * scale, f"max diff {np.abs(a - b).max()} at scale {scale}"


# ---- torch models (exported once per test module) ------------------------------------------------------


def torch_export(module, example, opset: int = 13, dynamic: bool = True, dynamo: bool = False) -> onnx.ModelProto:
    import torch

    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(module, (example,), dynamo=True, verbose=False)
            return prog.model_proto
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    return onnx.load_from_string(buf.getvalue())


def _randomize_bn(module) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def torch_models():
    """name -> (module, example input) for the architectures the equivalence tests cover."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.short is None else self.short(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.l1 = Block(8, 8)
            self.l2 = Block(8, 16, 2)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y = self.l2(self.l1(self.stem(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    class SE(nn.Module):
        def __init__(self, c, r):
            super().__init__()
            self.a = nn.Conv2d(c, r, 1)
            self.b = nn.Conv2d(r, c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * nn.functional.hardsigmoid(self.b(torch.relu(self.a(s))))

    class Mobile(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.Hardswish())
            self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.Hardswish())
            self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.BatchNorm2d(32), nn.Hardswish())
            self.se = SE(32, 8)
            self.project = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
            self.dwm = nn.Conv2d(16, 32, 3, 1, 1, groups=16)  # depthwise with channel multiplier 2
            self.head = nn.Sequential(nn.Conv2d(32, 24, 1), nn.SiLU())
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.project(self.se(self.dw(self.expand(x))))
            x = self.head(nn.functional.gelu(self.dwm(x)))
            return self.fc(x.mean((2, 3)))

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, 1, 1)
            self.a = nn.Conv2d(8, 6, 3, 1, 1)
            self.b = nn.Conv2d(8, 4, 1)
            self.mix = nn.Conv2d(13, 12, 1)
            self.p = nn.Conv2d(5, 8, 1)
            self.q = nn.Conv2d(7, 8, 1)
            self.s = nn.Conv2d(7, 8, 1)
            self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            z = torch.cat([self.a(y), x, torch.relu(self.b(y))], 1)  # graph input in the middle
            z = torch.relu(self.mix(z))
            u, v = torch.split(z, [5, 7], dim=1)
            w = self.p(u) + self.q(v) + self.s(z[:, 2:9])
            w = torch.relu(self.up(w))
            return self.fc(w.amax((2, 3)))

    class FlatNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
            self.c2 = nn.Conv2d(8, 6, 3, 1, 1)
            self.f1 = nn.Linear(6 * 4 * 4, 16)
            self.f2 = nn.Linear(16, 4)

        def forward(self, x):
            y = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
            y = torch.relu(self.c2(y))
            y = y.view(y.size(0), -1)
            return self.f2(torch.relu(self.f1(y)))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                                     nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2))

        def forward(self, x):
            return self.net(x)

    class Tokens(nn.Module):
        """3-D input: Linear layers export as MatMul + Add; LayerNorm over the last axis."""

        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(6, 12)
            self.l2 = nn.Linear(12, 8)
            self.ln = nn.LayerNorm(8)
            self.l3 = nn.Linear(8, 3)

        def forward(self, x):
            h = self.l2(nn.functional.gelu(self.l1(x)))
            return self.l3(self.ln(h)).mean(1)

    class Dense(nn.Module):
        """DenseNet-style: BatchNorm over concatenated features, a transition conv, reshape head."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.l1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
            self.l2 = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 4, 3, padding=1))
            self.t = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.AvgPool2d(2))
            self.fc = nn.Linear(8 * 2 * 2, 5)

        def forward(self, x):
            x = self.stem(x)
            x = torch.cat([x, self.l1(x)], 1)
            x = torch.cat([x, self.l2(x)], 1)
            x = self.t(x)
            return self.fc(x.reshape(x.shape[0], -1))

    class Shuffle(nn.Module):
        """Channel shuffle (Reshape/Transpose across channels): must be declined."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 6, 1)

        def forward(self, x):
            x = self.a(x)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.b(x).mean((2, 3))

    class Attention(nn.Module):
        """Self-attention: q/k/v projections meet in MatMuls of two computed tensors: declined."""

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
            return self.o(a @ self.v(x)).mean(1)

    class Upsampling(nn.Module):
        """FPN-style: a nearest and a bilinear upsample between convs (Upsample at opset 9, Resize later)."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, 2, 1)
            self.b = nn.Conv2d(8, 6, 3, 1, 1)
            self.c = nn.Conv2d(6, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = nn.functional.interpolate(torch.relu(self.a(x)), scale_factor=2.0, mode="nearest")
            y = nn.functional.interpolate(torch.relu(self.b(y)), scale_factor=2.0, mode="bilinear")
            return self.fc(torch.relu(self.c(y)).mean((2, 3)))

    models = {
        "upsample": (Upsampling(), torch.randn(1, 3, 8, 8)),
        "dense": (Dense(), torch.randn(1, 3, 4, 4)),
        "shuffle": (Shuffle(), torch.randn(1, 3, 4, 4)),
        "attention": (Attention(), torch.randn(1, 5, 6)),
        "resnet": (ResNet(), torch.randn(1, 3, 8, 8)),
        "mobile": (Mobile(), torch.randn(1, 3, 8, 8)),
        "branches": (Branches(), torch.randn(1, 3, 8, 8)),
        "flat": (FlatNet(), torch.randn(1, 3, 8, 8)),
        "mlp": (MLP(), torch.randn(2, 10)),
        "tokens": (Tokens(), torch.randn(1, 5, 6)),
    }
    for m, _ in models.values():
        _randomize_bn(m)
    return models


# ---- hand-built graphs ----------------------------------------------------------------------------------


class GraphBuilder:
    """Tiny helper to write ONNX graphs by hand, the way non-torch exporters lay them out."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.k = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, arr, base: str = "c") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def rand(self, *shape, scale: float = 0.5, base: str = "w") -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), base)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op_type.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        ins = [x, self.rand(cout, cin // group, k, k)]
        if bias:
            ins.append(self.rand(cout))
        return self.op("Conv", ins, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        return self.op("BatchNormalization", [
            x,
            self.const((self.rng.random(c) + 0.5).astype(np.float32)),
            self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32)),
            self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32)),
            self.const((self.rng.random(c) + 0.5).astype(np.float32)),
        ])

    def model(self, inputs: list[tuple[str, list]], outputs: list[str], opset: int = 17,
              elem=TensorProto.FLOAT) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(n, elem, s) for n, s in inputs]
        outs = [helper.make_tensor_value_info(n, elem, None) for n in outputs]
        g = helper.make_graph(self.nodes, "g", ins, outs, initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset < 21 else 10)
        inferred = onnx.shape_inference.infer_shapes(m)
        known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
        missing = []
        for o in m.graph.output:  # declare the output shapes the way exporters do
            if o.name in known and known[o.name].type.tensor_type.HasField("shape"):
                o.CopyFrom(known[o.name])
            else:
                missing.append(o)
        if missing:  # inference could not tell: take the shape from a run, batch symbolic
            got = dict(zip([o.name for o in m.graph.output], ort_run(m, random_feeds(m))))
            for o in missing:
                shape = ["N"] + list(got[o.name].shape[1:]) if got[o.name].ndim else []
                o.CopyFrom(helper.make_tensor_value_info(o.name, elem, shape))
        onnx.checker.check_model(m)
        return m


def test_builder_makes_valid_model():
    b = GraphBuilder()
    y = b.op("Relu", [b.conv("x", 3, 4)])
    m = b.model([("x", ["N", 3, 5, 5])], [y])
    out = ort_run(m, random_feeds(m))[0]
    assert out.shape == (2, 4, 5, 5) and (out >= 0).all()



# ---- the central check ------------------------------------------------------------------------------------


def expected_dims_after(an, keep) -> dict[tuple[str, int], int]:
    """(initializer, axis) -> length after pruning, counted from the group members and keep-sets."""
    shapes = {i.name: tuple(i.dims) for i in an.model.graph.initializer}
    removed: dict[tuple[str, int], set] = {}
    for g in an.groups:
        k = set(np.asarray(keep.get(g.id, np.arange(g.size))).tolist())
        for m in g.members:
            pos = removed.setdefault((m.initializer, m.axis), set())
            for c in range(g.size):
                if c not in k:
                    pos.update(int(p) for p in m.indices[c] if p >= 0)
    return {key: shapes[key[0]][key[1]] - len(pos) for key, pos in removed.items()}


def check_prune_equals_mask(an, keep, feeds, rel: float = 1e-4) -> onnx.ModelProto:
    """prune_channels output == mask_channels output in onnxruntime; shapes and MACs follow the keep-set."""
    from onnxfair.graph import mask_channels, model_cost, prune_channels

    pruned = prune_channels(an, keep)
    onnx.checker.check_model(pruned, full_check=True)
    masked = mask_channels(an, keep)
    got, want = ort_run(pruned, feeds), ort_run(masked, feeds)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, rel)
    # every member initializer has the length the keep-set implies
    inits = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    for (name, axis), n in expected_dims_after(an, keep).items():
        assert inits[name][axis] == n, (name, axis, inits[name], n)
    # MACs of each weighted layer shrink exactly with its weight
    dense_w = {i.name: int(np.prod(i.dims)) for i in an.model.graph.initializer}
    dense_rows = {r["node"]: r for r in model_cost(an.model, an.input_shapes).per_node}
    nodes = {n.name: n for n in pruned.graph.node if n.name}
    for r in model_cost(pruned, an.input_shapes).per_node:
        n = nodes.get(r["node"])
        if n is None or n.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose") or not r["macs"]:
            continue
        w = n.input[1]
        if w not in dense_w or w not in inits:
            continue
        ratio = int(np.prod(inits[w])) / dense_w[w]
        assert r["macs"] == round(dense_rows[r["node"]]["macs"] * ratio), (r, ratio)
    return pruned
