"""A prototype measured for bench/README.md, not part of the tool: FairGRAPE's share-keeping greedy over a
gradient-free per-group importance, W^2 * E_g[||x_in||^2] (a per-group Wanda score: each weight's square
times the mean energy of its input channel over group g's rows; the kernel offset is ignored). It asks
whether a group-aware importance that does not vanish on a well-fitted group protects the minority where
the squared-gradient one does not. The bench's fairgrape rows are re-run with the engine's squared
gradients replaced by these scores (`act`) or added to them after per-group normalisation (`mix`).

    python bench/proto_activation_fairgrape.py OUT.json act --models resnet_digits --methods fairgrape,magnitude \
        --sparsities 0.9 --repair balanced --finetune-epochs 4
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_methods as B  # noqa: E402
from onnxfair.importance import scores as S  # noqa: E402

GRADIENTS = S.accumulate_gradients


def weight_inputs(model: onnx.ModelProto) -> dict[str, tuple[str, str, int]]:
    """weight name -> (op, the data input it multiplies, Conv's group or Gemm's transB)."""
    out = {}
    for n in model.graph.node:
        attrs = {a.name: a.i for a in n.attribute}
        if n.op_type == "Conv" and len(n.input) > 1:
            out[n.input[1]] = ("Conv", n.input[0], attrs.get("group", 1))
        elif n.op_type == "Gemm":
            out[n.input[1]] = ("Gemm", n.input[0], attrs.get("transB", 0))
    return out


def input_energy(model: onnx.ModelProto, ds, inputs: list[str]) -> dict[str, np.ndarray]:
    """[K, C] per data input: each channel's summed square over positions, averaged over group g's rows."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in inputs)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    K = len(ds.group_labels)
    sums = {x: 0.0 for x in inputs}
    rows = np.zeros(K)
    for feed, _y, gids in ds.batches(256):
        gids = np.asarray(gids)
        rows += np.bincount(gids, minlength=K)
        for x, v in zip(inputs, sess.run(inputs, {k: np.asarray(a) for k, a in feed.items()})):
            e = v.astype(np.float64) ** 2
            e = e.reshape(e.shape[0], e.shape[1], -1).sum(-1) if e.ndim > 2 else e
            sums[x] = sums[x] + np.stack([e[gids == g].sum(0) for g in range(K)])
    return {x: s / rows[:, None] for x, s in sums.items()}


def per_group_scores(model: onnx.ModelProto, mode: str):
    """A stand-in for the engine: its squared gradients replaced by (act) or summed with (mix) W^2 * energy."""
    def accumulate(mod, dataset, names, **kw):
        stats = GRADIENTS(mod, dataset, names, **kw)
        uses = weight_inputs(model)
        energy = input_energy(model, dataset, sorted({uses[n][1] for n in names}))
        for n in names:
            w = mod.params[n].detach().double().numpy()
            op, x, attr = uses[n]
            A = energy[x]
            K = A.shape[0]
            if op == "Conv":  # input channel of W[o, i]: the group's offset plus i
                O, I = w.shape[:2]
                ch = (np.arange(O)[:, None] // (O // attr)) * I + np.arange(I)[None, :]
                imp = np.stack([w ** 2 * A[g][ch][:, :, None, None] for g in range(K)])
            else:
                imp = np.stack([w ** 2 * (A[g][None, :] if attr else A[g][:, None]) for g in range(K)])
            if mode == "mix":
                unit = (K,) + (1,) * w.ndim
                imp = imp / imp.reshape(K, -1).sum(1).reshape(unit) + stats.sq[n] / stats.sq[n].reshape(K, -1).sum(1).reshape(unit)
            stats.sq[n] = imp
        return stats
    return accumulate


def main(argv: list[str]) -> None:
    out, mode, args = argv[0], argv[1], B.parse_args(argv[2:])
    name = args.models[0]
    file, prefix, attr = B.FIXTURES[name]
    model = onnx.load(str(ROOT / "fixtures" / file))
    calib = B.load_dataset(ROOT / "fixtures" / f"{prefix}_calib.npz", model, attr)
    held = B.load_dataset(ROOT / "fixtures" / f"{prefix}_{args.eval_split}.npz", model, attr)
    patched = per_group_scores(model, mode)
    rows = []
    for method in args.methods:
        S.accumulate_gradients = patched if method == "fairgrape" else GRADIENTS
        for sparsity in args.sparsities:
            for seed in args.seeds:
                r = B.one_run(model, calib, held, name, method, sparsity, seed, args)
                rows.append(r)
                print(f"{method:10s} s={sparsity} seed={seed} acc {100 * r['accuracy']:.2f} "
                      f"std_delta {100 * r['std_delta']:.2f} groups {r['pruned_groups']}", flush=True)
    Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
