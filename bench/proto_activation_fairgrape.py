"""A prototype measured for bench/README.md, not part of the tool: FairGRAPE's share-keeping greedy over a
gradient-free per-group importance, W^2 * E_g[||x_in||^2] (a per-group Wanda score: each weight's square
times the mean energy of its input channel over group g's rows; the kernel offset is ignored). It asks
whether a group-aware importance that does not vanish on a well-fitted group protects the minority where
the squared-gradient one does not. The bench's fairgrape rows are re-run with the engine's squared
gradients replaced by these scores (`act`) or added to them after per-group normalisation (`mix`).

    python bench/proto_activation_fairgrape.py OUT.json act --models resnet_digits --methods fairgrape,magnitude \
        --sparsities 0.9 --repair balanced --finetune-epochs 4
"""
import sys, json, numpy as np, onnx, onnxruntime as ort
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import bench_methods as B
from onnxfair.importance import scores as S
from onnxfair.importance.engine import GradStats
from onnx import helper

MODEL = {}
MODE = sys.argv[2] if len(sys.argv) > 2 else "act"

def consumers(m):
    out = {}
    for n in m.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1:
            g = next((a.i for a in n.attribute if a.name == "group"), 1)
            out[n.input[1]] = ("Conv", n.input[0], g)
        elif n.op_type == "Gemm":
            tb = next((a.i for a in n.attribute if a.name == "transB"), 0)
            out[n.input[1]] = ("Gemm", n.input[0], tb)
    return out

def act_stats(m, ds, names):
    cons = consumers(m)
    want = sorted({cons[n][1] for n in names})
    m2 = onnx.ModelProto(); m2.CopyFrom(m)
    for w in want:
        m2.graph.output.append(helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m2.SerializeToString(), providers=["CPUExecutionProvider"])
    K = len(ds.group_labels)
    acc = {w: None for w in want}; cnt = np.zeros(K)
    for inputs, y, gids in ds.batches(256):
        outs = sess.run(want, {k: np.asarray(v) for k, v in inputs.items()})
        gids = np.asarray(gids); cnt += np.bincount(gids, minlength=K)
        for w, o in zip(want, outs):
            e = (o.astype(np.float64) ** 2)
            e = e.reshape(e.shape[0], e.shape[1], -1).sum(-1) if e.ndim > 2 else e
            s = np.stack([e[gids == g].sum(0) for g in range(K)])
            acc[w] = s if acc[w] is None else acc[w] + s
    return {w: a / cnt[:, None] for w, a in acc.items()}, cons

orig = S.accumulate_gradients
def patched(mod, dataset, names, **kw):
    st = orig(mod, dataset, names, **kw)
    m = MODEL["m"]
    a, cons = act_stats(m, dataset, names)
    params = mod.params
    sq = {}
    for n in names:
        w = params[n].detach().double().numpy()
        op, x, attr = cons[n]
        A = a[x]  # [K, C_in]
        K = A.shape[0]
        if op == "Conv":
            O, I = w.shape[:2]; G = attr
            ch = (np.arange(O)[:, None] // (O // G)) * I + np.arange(I)[None, :]  # [O, I]
            imp = np.stack([(w ** 2) * A[g][ch][:, :, None, None] for g in range(K)])
        else:
            imp = np.stack([(w ** 2) * (A[g][None, :] if attr else A[g][:, None]) for g in range(K)])
        if MODE == "mix":
            imp = imp / imp.reshape(K, -1).sum(1).reshape((K,) + (1,) * w.ndim) + st.sq[n] / st.sq[n].reshape(K, -1).sum(1).reshape((K,) + (1,) * w.ndim)
        sq[n] = imp
    st.sq = sq
    return st
S.accumulate_gradients = patched

args = B.parse_args(sys.argv[3:])
name = args.models[0]
file, prefix, attr = B.FIXTURES[name]
model = onnx.load(f"{ROOT}/fixtures/{file}")
MODEL["m"] = model
calib = B.load_dataset(f"{ROOT}/fixtures/{prefix}_calib.npz", model, attr)
ev = B.load_dataset(f"{ROOT}/fixtures/{prefix}_{args.eval_split}.npz", model, attr)
rows = []
for meth in args.methods:
    for s in args.sparsities:
        for seed in args.seeds:
            if meth != "fairgrape":
                S.accumulate_gradients = orig
            else:
                S.accumulate_gradients = patched
            r = B.one_run(model, calib, ev, name, meth, s, seed, args)
            rows.append(r)
            print(f"{meth:10s} s={s} seed={seed} acc {100*r['accuracy']:.2f} std {100*r['std_delta']:.2f} groups {r['pruned_groups']}", flush=True)
json.dump(rows, open(sys.argv[1], "w"))
