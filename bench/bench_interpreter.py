"""Forward+backward time of the ONNX interpreter against the same network as a native torch module.

    python bench/bench_interpreter.py [--batch 32] [--repeats 30] [--device cpu|cuda] [--threads N]

For each fixture CNN a seeded native module (fixtures.models) is exported to ONNX here (BatchNorm is
folded into the convolutions by the exporter), and the exported graph is run by `OnnxModule`; so are two
text classifiers (a bidirectional LSTM and a GRU over 64 tokens), whose native module is the computation. Two native
baselines: the module as written (Conv + BatchNorm) and the same module with BatchNorm folded into the
convolutions (`fuse_conv_bn_eval`), which is the computation the ONNX graph describes; the ratio that
matters is interpreter / native-fused. Timings are medians (and minima, the steadier figure on a shared
machine) of interleaved runs, each one forward pass and one backward pass of a cross-entropy loss with
respect to every parameter.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fixtures.models import MobileNetDigits, ResNetDigits  # noqa: E402
from onnxfair.interpret import OnnxModule  # noqa: E402


def fuse_bn(module: nn.Module) -> nn.Module:
    """Copy of `module` with every Conv2d→BatchNorm2d pair folded (eval semantics), BN replaced by Identity."""
    m = copy.deepcopy(module).eval()

    def walk(parent: nn.Module) -> None:
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            ca, cb = parent._modules[a], parent._modules[b]
            if isinstance(ca, nn.Conv2d) and isinstance(cb, nn.BatchNorm2d):
                parent._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(ca, cb)
                parent._modules[b] = nn.Identity()
        for child in parent.children():
            walk(child)

    walk(m)
    # BasicBlock keeps conv/bn as attributes, not a Sequential: pair them by name
    for blk in m.modules():
        for i in (1, 2):
            conv, bn = getattr(blk, f"conv{i}", None), getattr(blk, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(blk, f"conv{i}", torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
                setattr(blk, f"bn{i}", nn.Identity())
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def export(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, (example,), dynamo=True, verbose=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 20)}},
        )
        prog.save(buf)
    return onnx.load_from_string(buf.getvalue())


class TextClassifier(nn.Module):
    """Token ids [N, 64] -> embedding -> recurrent layer (batch first) -> the last step's state -> 2 classes."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0][:, -1])


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    loss = F.cross_entropy(model(x), y)
    loss.backward()


def timed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sync) -> float:
    sync()
    t0 = time.perf_counter()
    step(model, x, y)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    rows = []
    cases = []
    for name, cls in [("resnet_digits", ResNetDigits), ("mobilenet_digits", MobileNetDigits)]:
        native = cls().eval()
        for m in native.modules():  # non-trivial statistics so that folding is exercised
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        interp = OnnxModule(export(native, torch.randn(2, 3, 32, 32))).eval()
        cases.append((name, native, fuse_bn(native), interp, torch.randn(args.batch, 3, 32, 32), 10))
    for name, rnn in [("text_lstm", nn.LSTM(64, 128, batch_first=True, bidirectional=True)),
                      ("text_gru", nn.GRU(64, 128, batch_first=True))]:
        native = TextClassifier(rnn).eval()  # no BatchNorm: the native module is the exported computation
        interp = OnnxModule(export(native, torch.randint(0, 1000, (2, 64)))).eval()
        cases.append((name, native, native, interp, torch.randint(0, 1000, (args.batch, 64)), 2))
    for name, native, fused, interp, x, classes in cases:
        with torch.no_grad():
            diff = (interp(x) - native(x)).abs().max().item()
        native, fused, interp = native.to(dev), fused.to(dev), interp.to(dev)
        x = x.to(dev)
        y = torch.randint(0, classes, (args.batch,), device=dev)
        models = {"native": native, "native-fused": fused, "interpreter": interp}
        if fused is native:
            del models["native-fused"]
        for _ in range(args.warmup):
            for m in models.values():
                step(m, x, y)
        times: dict[str, list[float]] = {k: [] for k in models}
        keys = list(models)
        for r in range(args.repeats):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:  # interleaved, rotating order: drift hits all alike
                times[k].append(timed(models[k], x, y, sync))
        for stat, fn in (("median", statistics.median), ("min", min)):
            t = {k: fn(v) * 1e3 for k, v in times.items()}
            t.setdefault("native-fused", t["native"])
            rows.append((name, stat, t, diff))

    print(f"device={dev}  batch={args.batch}  repeats={args.repeats}  torch threads={torch.get_num_threads()}")
    print("forward+backward ms; 'fused' = native module with BatchNorm folded, the computation in the ONNX graph")
    print(f"{'model':<18} {'stat':<7} {'native':>8} {'fused':>8} {'interp':>8} {'interp/fused':>13} {'interp/native':>14} {'max|diff|':>10}")
    for name, stat, t, diff in rows:
        print(f"{name:<18} {stat:<7} {t['native']:>8.2f} {t['native-fused']:>8.2f} {t['interpreter']:>8.2f} "
              f"{t['interpreter'] / t['native-fused']:>12.2f}x {t['interpreter'] / t['native']:>13.2f}x {diff:>10.2e}")


if __name__ == "__main__":
    main()
