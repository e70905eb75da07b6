"""`onnxfair sweep`: the Pareto front against an independent characterisation, the recommendation rule,
resumability, the results table against `onnxfair prune` run alone, and the self-contained report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxfair.sweep as sweep_mod
from cli.main import app
from onnxfair.evaluate import evaluate_models
from onnxfair.metrics import degradation
from onnxfair.sweep import (
    ROW_FIELDS, DataSpec, SweepPlan, expand, format_sparsity, mark_front, pareto_front, parse_list, read_rows_csv, recommend, result_row, run_id,
)
from onnxfair.errors import UsageError
from onnxfair.prune import DenseCache, PruneConfig, PruneResult, prune_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------------ the Pareto front


def test_front_hand_made_cases():
    pts = [
        (0.90, 0.05),  # 0 front: most accurate
        (0.90, 0.05),  # 1 exact duplicate of 0: neither dominates the other
        (0.90, 0.06),  # 2 same accuracy as 0, worse disparity: dominated
        (0.80, 0.01),  # 3 front: least disparity
        (0.70, 0.01),  # 4 same disparity as 3, less accurate: dominated
        (0.85, 0.03),  # 5 front: in between
        (0.75, 0.04),  # 6 dominated by 5 (and 3)
        (None, 0.00),  # 7 missing accuracy: never on the front, dominates nothing
        (0.99, float("nan")),  # 8 non-finite disparity: likewise
    ]
    assert pareto_front(pts) == [True, True, False, True, False, True, False, False, False]
    assert pareto_front([(0.5, 0.2)]) == [True]
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 0.1), (0.5, 0.1), (0.5, 0.1)]) == [True, True, True]


def _front_by_envelopes(pts):
    """Independent characterisation: i is on the front iff its accuracy is the best among points with
    disparity <= its own, and its disparity is the least among points with accuracy >= its own."""
    return [
        a == max(b for b, e in pts if e <= d) and d == min(e for b, e in pts if b >= a)
        for a, d in pts
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_front_matches_envelope_characterisation(grid):
    pts = [(a / 6, d / 60) for a, d in grid]  # a coarse grid makes ties and duplicates common
    assert pareto_front(pts) == _front_by_envelopes(pts)


def _rows(*specs):
    return [
        {"run_id": rid, "accuracy": a, "std_delta": d, "macs_ratio": m, "method": "x", "sparsity": 0.5}
        for rid, a, d, m in specs
    ]


def test_the_table_prints_whole_run_ids():
    """Before: run ids were cut at 31 characters, so seeds 10 and 11 of one setting printed alike."""
    from onnxfair.sweep import format_rows

    rows = [{"run_id": f"fairgrape-unstr-s0.123456789-seed{k}", "accuracy": 0.8, "accuracy_delta": -0.01,
             "std_delta": 0.02, "worst_group_accuracy": 0.7, "accuracy_gap": 0.05, "macs_ratio": 1.0,
             "latency_ms": None, "pareto": k == 10, "recommended": False} for k in (10, 11)]
    lines = format_rows(rows, "std_delta").splitlines()
    assert [line.split()[0] for line in lines[2:]] == [r["run_id"] for r in rows]
    assert lines[0].index("acc%") == lines[2].index("80.00") + len("80.00") - len("acc%")


def test_recommendation_rule():
    rows = _rows(("a", 0.90, 0.050, 0.8), ("b", 0.85, 0.010, 0.5), ("c", 0.70, 0.005, 0.3), ("d", 0.80, 0.020, 0.5))
    # score accuracy - disparity: a 0.850, b 0.840, c 0.695; d is dominated by b
    idx, why = recommend(rows)
    assert rows[idx]["run_id"] == "a" and "accuracy - 1 x std_delta" in why
    idx, _ = recommend(rows, disparity_weight=2.0)  # a 0.80, b 0.83, c 0.69
    assert rows[idx]["run_id"] == "b"
    idx, why = recommend(rows, max_disparity=0.02)
    assert rows[idx]["run_id"] == "b" and "at most 0.02" in why
    idx, _ = recommend(rows, max_disparity=0.005)  # inclusive bound
    assert rows[idx]["run_id"] == "c"
    idx, why = recommend(rows, max_disparity=0.001)
    assert idx is None and "lowest is 0.005 (c)" in why
    idx, _ = recommend(rows, max_macs_ratio=0.5)  # a is excluded; among b, c, d: b
    assert rows[idx]["run_id"] == "b"
    idx, why = recommend(rows, max_macs_ratio=0.1)
    assert idx is None and "macs_ratio <= 0.1" in why
    # ties in the score go to the higher accuracy, then lower disparity, then smaller MACs, then the id
    tie = _rows(("y", 0.80, 0.00, 0.5), ("x", 0.81, 0.01, 0.5))
    assert tie[recommend(tie)[0]]["run_id"] == "x"
    dup = _rows(("q", 0.8, 0.01, 0.6), ("p", 0.8, 0.01, 0.6), ("r", 0.8, 0.01, 0.4))
    assert dup[recommend(dup)[0]]["run_id"] == "r"
    dup2 = _rows(("q", 0.8, 0.01, 0.6), ("p", 0.8, 0.01, 0.6))
    assert dup2[recommend(dup2)[0]]["run_id"] == "p"
    none = _rows(("n", 0.8, None, 0.5))
    assert recommend(none)[0] is None


def test_mark_front_sets_flags_in_place():
    rows = _rows(("a", 0.90, 0.050, 0.8), ("b", 0.85, 0.010, 0.5), ("d", 0.80, 0.020, 0.5))
    rec, _ = mark_front(rows, max_disparity=0.03)
    assert [r["pareto"] for r in rows] == [True, True, False]
    assert rec == "b" and [r["recommended"] for r in rows] == [False, True, False]


def test_the_front_is_that_of_the_runs_within_the_macs_budget():
    """a dominates b, but is over --max-macs-ratio: b is recommended, and it used to be marked off the front."""
    rows = _rows(("a", 0.90, 0.005, 0.8), ("b", 0.85, 0.010, 0.5), ("c", 0.80, 0.020, 0.5))
    rec, _ = mark_front(rows, max_macs_ratio=0.6)
    assert rec == "b" and [r["pareto"] for r in rows] == [False, True, False]
    mark_front(rows)
    assert [r["pareto"] for r in rows] == [True, False, False]


def test_run_ids_and_lists():
    assert run_id("fairgrape", 0.5, 0) == "fairgrape-s0.50-seed0"
    assert run_id("magnitude", 0.3, 2, structured=False) == "magnitude-unstr-s0.30-seed2"
    assert format_sparsity(0.125) == "0.125" and format_sparsity(0.12) == "0.12"  # no collision
    assert parse_list("0.3, 0.5,0.3", float, "--sparsities") == (0.3, 0.5)
    with pytest.raises(UsageError, match="'x' is not a number"):
        parse_list("0.3,x", float, "--sparsities")
    with pytest.raises(UsageError, match="empty"):
        parse_list(" , ", int, "--seeds")


def test_damping_reaches_the_fairgrape_runs_only(tmp_path):
    plan = SweepPlan(model="m.onnx", data=DataSpec(data="d.npz", eval_data=None, groups=["race"]), out=tmp_path,
                     methods=("magnitude", "fairgrape", "taylor"), sparsities=(0.5,),
                     base=PruneConfig(damping=10.0))
    assert {r.cfg.method: r.cfg.damping for r in expand(plan)} == {"magnitude": 0.0, "fairgrape": 10.0, "taylor": 0.0}
    with pytest.raises(UsageError, match="finite number >= 0"):
        expand(dataclasses.replace(plan, base=PruneConfig(damping=float("nan"))))
    with pytest.raises(UsageError, match="--damping 10 has no effect on any run of this sweep: only the fairgrape method reads it"):
        expand(dataclasses.replace(plan, methods=("magnitude",)))


# --------------------------------------------------------------- sweep mechanics with a counting prune

def mlp_model(seed: int = 0, f: int = 6, h: int = 16, c: int = 3) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm with a symbolic batch: the hidden layer is prunable."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(h, f)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(scale=0.1, size=h).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.normal(size=(c, h)).astype(np.float32) / 2, "W2"),
        numpy_helper.from_array(rng.normal(scale=0.1, size=c).astype(np.float32), "B2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", f])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture
def mlp(tmp_path):
    model = mlp_model()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    w2 = numpy_helper.to_array(model.graph.initializer[2])
    y = (np.maximum(x @ w1.T, 0) @ w2.T).argmax(1)
    flip = rng.random(400) < 0.15
    y[flip] = rng.integers(0, 3, flip.sum())
    race = rng.choice(np.array(["A", "B", "C"]), 400, p=[0.6, 0.3, 0.1])
    np.savez(tmp_path / "calib.npz", x=x[:200], y=y[:200], race=race[:200])
    np.savez(tmp_path / "eval.npz", x=x[200:], y=y[200:], race=race[200:])
    return {"path": path, "calib": tmp_path / "calib.npz", "eval": tmp_path / "eval.npz", "model": model}


class CountingPrune:
    """Stands in for prune_model: zeroes the smallest |w| of W1 (a real, cheap pruning) and reports in the
    prune report layout; counts its calls."""

    def __init__(self):
        self.calls: list[tuple[str, float, int]] = []

    def __call__(self, model, calib, eval_ds, cfg, progress=lambda s: None, cache=None):
        self.calls.append((cfg.method, cfg.sparsity, cfg.seed))
        pruned = onnx.ModelProto()
        pruned.CopyFrom(model)
        w = numpy_helper.to_array(pruned.graph.initializer[0]).copy()
        shift = {"magnitude": 0.0, "taylor": 0.05}.get(cfg.method, 0.1)
        k = int(round(min(cfg.sparsity + shift, 0.95) * w.size))
        w.flat[np.argsort(np.abs(w), axis=None)[:k]] = 0
        pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W1"))
        held = eval_ds if eval_ds is not None else calib.split(cfg.eval_split, seed=cfg.seed)[1]
        bd, bp = evaluate_models([model, pruned], held, latency=False)
        report = {
            "method": {**dataclasses.asdict(cfg), "kind": "structured" if cfg.structured else "unstructured",
                       "versions": {"onnxfair": "test"}},
            "cost": {"macs_dense": w.size, "macs_pruned": w.size - k, "params_dense": w.size, "params_pruned": w.size - k,
                     "bytes_dense": 4 * w.size, "bytes_pruned": 4 * (w.size - k), "macs_ratio": (w.size - k) / w.size,
                     "params_ratio": (w.size - k) / w.size},
            "evaluation": {"source": "eval-data", "n": len(held), "groups_by": held.attributes},
            "dense": bd, "pruned": bp, "degradation": degradation(bd, bp), "timing": {},
        }
        return PruneResult(pruned, report)


@pytest.fixture
def counting(monkeypatch):
    fake = CountingPrune()
    monkeypatch.setattr(sweep_mod, "prune_model", fake)
    return fake


def sweep_args(mlp, out, *extra):
    return ["sweep", mlp["path"], "--data", mlp["calib"], "--eval-data", mlp["eval"], "--groups", "race",
            "--methods", "magnitude,taylor", "--sparsities", "0.3,0.6", "--jobs", "1", "--out", out, *extra]


def test_sweep_writes_rows_from_run_reports_and_resumes(mlp, tmp_path, counting):
    out = tmp_path / "sw"
    r = run(*sweep_args(mlp, out, "--no-plots"))
    assert r.exit_code == 0, r.output
    assert len(counting.calls) == 4
    ids = ["magnitude-s0.30-seed0", "magnitude-s0.60-seed0", "taylor-s0.30-seed0", "taylor-s0.60-seed0"]
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == ids
    doc = json.loads((out / "results.json").read_text())
    assert [row["run_id"] for row in doc["rows"]] == ids
    # every row value is read from its run report, and the CSV holds the same values as the JSON
    for row in doc["rows"]:
        rep = json.loads((out / "runs" / f"{row['run_id']}.json").read_text())
        assert row["accuracy"] == rep["pruned"]["overall"]["accuracy"]
        assert row["dense_accuracy"] == rep["dense"]["overall"]["accuracy"]
        assert row["std_delta"] == rep["degradation"]["std_delta"]
        assert row["max_excess_gap"] == rep["degradation"]["max_excess_gap"]
        assert row["worst_group_accuracy"] == rep["pruned"]["disparity"]["worst_group_accuracy"]
        assert row["macs_ratio"] == rep["cost"]["macs_ratio"]
        assert row["latency_ms"] is not None and row["latency_ms"] == rep["latency"]["pruned"]["median_ms"]
        assert rep["sweep"]["run_id"] == row["run_id"] and rep["method"]["latency"] is True
        assert rep["sweep"]["threads"]["onnxruntime"] == 0  # its default, an integer as a pool's 1 is (was "default")
    assert doc["settings"]["jobs"] == 1 and doc["settings"]["processes"] == 1
    assert read_rows_csv(out / "results.csv") == doc["rows"]
    assert list(doc["rows"][0]) == list(ROW_FIELDS)
    assert sum(row["recommended"] for row in doc["rows"]) == 1
    assert not (out / ".pending").exists()  # models kept only until they were timed
    assert "recommended:" in r.stdout and "[4/4]" in r.stderr and "[4/4]" not in r.stdout

    # a second invocation reuses everything: no prune call, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    r = run(*sweep_args(mlp, out, "--no-plots"))
    assert r.exit_code == 0 and len(counting.calls) == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    assert json.loads((out / "results.json").read_text())["rows"] == doc["rows"]
    assert json.loads((out / "results.json").read_text())["settings"]["processes"] == 0  # nothing ran

    # one run missing and one cut in half (an interrupted non-atomic writer): exactly those two are redone
    (out / "runs" / "taylor-s0.30-seed0.json").unlink()
    half = out / "runs" / "magnitude-s0.60-seed0.json"
    half.write_text(half.read_text()[:200])
    r = run(*sweep_args(mlp, out, "--no-plots"))
    assert r.exit_code == 0
    assert sorted(counting.calls[4:]) == [("magnitude", 0.6, 0), ("taylor", 0.3, 0)]
    assert "2 of 4 runs already done" in r.stderr

    # a --no-latency resume reuses the timed runs, but its rows show no latency (before: an earlier sweep's)
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency"))
    assert r.exit_code == 0 and len(counting.calls) == 6
    assert all(row["latency_ms"] is None and row["dense_latency_ms"] is None
               for row in json.loads((out / "results.json").read_text())["rows"])
    assert "latency" in json.loads((out / "runs" / "taylor-s0.30-seed0.json").read_text())

    # a changed pass-through setting or a changed data file invalidates every stored run
    r = run(*sweep_args(mlp, out, "--no-plots", "--round-to", "4"))
    assert r.exit_code == 0 and len(counting.calls) == 10
    np.savez(mlp["eval"], **{k: v[:150] for k, v in np.load(mlp["eval"]).items()})
    r = run(*sweep_args(mlp, out, "--no-plots", "--round-to", "4", "--no-latency"))
    assert r.exit_code == 0 and len(counting.calls) == 14
    assert all(row["latency_ms"] is None for row in json.loads((out / "results.json").read_text())["rows"])


def test_a_resume_redoes_the_runs_when_an_image_of_the_manifest_changes(tmp_path, counting):
    """Before: only the manifest file was hashed, so a sweep resumed over changed images reused every run,
    and its rows described images no longer there."""
    from PIL import Image

    model = mlp_model()  # the MLP read from a 2 x 3 grey image: Flatten in front of its first Gemm
    model.graph.node[0].input[0] = "flat"
    model.graph.node.insert(0, helper.make_node("Flatten", ["x"], ["flat"]))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 3]))
    onnx.save(model, tmp_path / "img.onnx")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (2, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        rows.append({"path": f"im{i}.png", "label": i % 3, "tone": "dark" if i % 4 == 0 else "light"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    args = ["sweep", tmp_path / "img.onnx", "--data", tmp_path / "m.csv", "--groups", "tone", "--methods", "magnitude",
            "--sparsities", "0.5", "--jobs", "1", "--no-plots", "--no-latency", "--out", tmp_path / "sw"]
    assert run(*args).exit_code == 0 and len(counting.calls) == 1
    assert run(*args).exit_code == 0 and len(counting.calls) == 1  # unchanged: reused
    Image.fromarray(np.full((2, 3), 7, dtype=np.uint8)).save(tmp_path / "im5.png")
    r = run(*args)
    assert r.exit_code == 0 and len(counting.calls) == 2 and "already done" not in r.stderr


def test_report_is_self_contained_with_valid_pngs(mlp, tmp_path, counting):
    from PIL import Image

    out = tmp_path / "sw"
    r = run(*sweep_args(mlp, out, "--no-latency", "--keep-models", "--disparity", "max_excess_gap"))
    assert r.exit_code == 0, r.output
    for name in ("pareto.png", "groups.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000
        with Image.open(out / name) as im:
            im.verify()
    with Image.open(out / "pareto.png") as im:
        assert im.size[0] > 600 and im.size[1] > 400
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    for bad in ("http://", "https://", "<link", "<script", "@import", "url("):
        assert bad not in page
    doc = json.loads((out / "results.json").read_text())
    rec = doc["recommendation"]["run_id"]
    assert rec in page and doc["disparity"]["metric"] == "max_excess_gap"
    assert sorted(p.stem for p in (out / "models").glob("*.onnx")) == sorted(row["run_id"] for row in doc["rows"])
    onnx.checker.check_model(onnx.load(out / "models" / f"{rec}.onnx"))


def test_a_resume_never_reuses_a_kept_model_of_other_settings(mlp, tmp_path, counting):
    """Before: runs redone without --keep-models left the earlier settings' models in models/, and a later
    --keep-models sweep reused the reports with those files (report and model of different settings, exit 0)."""
    out = tmp_path / "sw"
    assert run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models", "--round-to", "4")).exit_code == 0
    assert run(*sweep_args(mlp, out, "--no-plots", "--no-latency")).exit_code == 0  # other settings, no models
    assert len(counting.calls) == 8
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models"))
    assert r.exit_code == 0 and len(counting.calls) == 12  # redone: no file is known to hold these runs' models
    for p in (out / "runs").glob("*.json"):
        digest = json.loads(p.read_text())["sweep"]["model_sha256"]
        assert digest == hashlib.sha256((out / "models" / f"{p.stem}.onnx").read_bytes()).hexdigest()
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models"))
    assert r.exit_code == 0 and len(counting.calls) == 12  # now its own files: reused
    (out / "models" / "taylor-s0.30-seed0.onnx").write_bytes(b"not this run's model")
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models"))
    assert r.exit_code == 0 and counting.calls[12:] == [("taylor", 0.3, 0)]


def test_models_an_earlier_sweep_kept_are_named_not_taken_for_this_ones(mlp, tmp_path, counting):
    """Kept models stay (nothing the user may want is deleted), but a sweep that did not write them says so."""
    out = tmp_path / "sw"
    assert run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models")).exit_code == 0
    assert len(list((out / "models").glob("*.onnx"))) == 4
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models"))  # the same grid: all its own
    assert r.exit_code == 0 and "did not keep" not in r.stderr
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models", "--sparsities", "0.3"))
    assert r.exit_code == 0
    assert (f"note: {out / 'models'} also holds 2 model files this sweep did not keep (an earlier sweep's, e.g. "
            "magnitude-s0.60-seed0.onnx); this sweep's are the run ids of results.json") in r.stderr.splitlines()
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency"))
    assert r.exit_code == 0 and "holds 4 model files this sweep did not keep" in r.stderr
    assert len(list((out / "models").glob("*.onnx"))) == 4


@pytest.mark.parametrize("extra, message", [
    (["--methods", "magnitude,prunezilla"], "unknown method 'prunezilla'"),
    (["--sparsities", "0.5,1.5"], "sparsity 1.5 in --sparsities is outside (0, 1)"),
    (["--sparsities", "0"], "outside (0, 1)"),
    (["--sparsities", "half"], "'half' is not a number"),
    (["--seeds", "0,one"], "'one' is not an integer"),
    (["--max-macs-ratio", "2"], "--max-macs-ratio 2.0 is outside"),
    # a combination one run refuses is refused before the first run starts (it used to stop the sweep partway)
    (["--methods", "magnitude,bilevel", "--iterations", "2"], "bilevel in --methods is not iterative (it trains its masks in one go); drop --iterations, or run bilevel in a separate sweep without it"),
    # the weight must be finite (NaN made results.json invalid JSON) and >= 0 (a negative one rewards disparity)
    (["--disparity-weight", "nan"], "--disparity-weight nan must be a finite number >= 0"),
    (["--disparity-weight", "-0.5"], "--disparity-weight -0.5 must be a finite number >= 0"),
    (["--disparity-weight", "inf"], "--disparity-weight inf must be a finite number >= 0"),
    (["--max-disparity", "0.05", "--disparity-weight", "5"], "--disparity-weight 5 has no effect with --max-disparity"),
    (["--max-disparity", "nan"], "--max-disparity nan must be a finite number >= 0"),
])
def test_bad_input_is_one_line_exit_2(mlp, tmp_path, extra, message):
    r = run(*sweep_args(mlp, tmp_path / "sw"), *extra)
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "sw").exists()


def test_a_results_file_or_plot_no_sweep_wrote_is_never_replaced(mlp, tmp_path, counting):
    """Before: a sweep that computed new runs deleted any results.csv, results.json, report.html or PNG of
    those names in --out, a user's own included (say with --out .)."""
    out = tmp_path / "sw"
    r = run(*sweep_args(mlp, out, "--sparsities", "0.3", "--methods", "magnitude", "--no-latency"))
    assert r.exit_code == 0, r.output
    ours = {name: (out / name).read_bytes() for name in ("results.csv", "results.json", "report.html", "pareto.png")}
    for name, text in (("results.csv", "a,b\n1,2\n"), ("results.json", '{"mine": 1}'), ("report.html", "<p>mine</p>"),
                       ("pareto.png", "not a sweep's plot")):
        (out / name).write_text(text)
        r = run(*sweep_args(mlp, out, "--no-latency"))
        assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0, r.output
        assert f"holds {name}, which no onnxfair sweep wrote" in r.stderr and (out / name).read_text() == text
        (out / name).write_bytes(ours[name])  # a sweep's own file: replaced as before
    from matplotlib.figure import Figure  # a plot as sweeps wrote it before the onnxfair mark: matplotlib's tag

    Figure().savefig(out / "pareto.png", format="png")
    calls = len(counting.calls)
    r = run(*sweep_args(mlp, out, "--no-latency"))
    assert r.exit_code == 0 and len(counting.calls) == calls + 3 and "removed the earlier results" in r.stderr
    Figure().savefig(out / "pareto.png", format="png")
    (out / "results.json").unlink()  # without a sweep's results.json beside it, not the sweep's
    r = run(*sweep_args(mlp, out, "--no-latency"))
    assert r.exit_code == 2 and "holds pareto.png, which no onnxfair sweep wrote" in r.stderr


def test_json_into_the_new_out_folder(mlp, tmp_path, counting):
    """Before: --json DIR/results.json was refused while DIR did not exist yet, though the sweep creates DIR and
    writes that very document there; another file in DIR (its CSV here) would have been overwritten."""
    out = tmp_path / "sw"
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--json", out / "results.csv"))
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0
    assert f"--json {out / 'results.csv'} is inside --out {out}" in r.stderr and not out.exists()
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--json", out))  # before: refused after every run
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and not counting.calls
    assert f"--json {out} is the --out folder or a folder above it; give a file path" in r.stderr and not out.exists()
    r = run(*sweep_args(mlp, out / "inner", "--no-plots", "--no-latency", "--json", out))
    assert r.exit_code == 2 and "a folder above it" in r.stderr and not out.exists() and not counting.calls
    r = run(*sweep_args(mlp, out, "--no-plots", "--no-latency", "--json", out / "results.json"))
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["rows"]) == 4 and read_rows_csv(out / "results.csv") == doc["rows"]


def test_an_input_the_sweep_would_write_is_refused_before_any_run(mlp, tmp_path, counting):
    """Before: a model kept by an earlier sweep, given as this sweep's input, was refused only when the run that
    writes it was reached, after the runs before it had been computed."""
    out = tmp_path / "sw"
    (out / "models").mkdir(parents=True)
    model = out / "models" / "taylor-s0.60-seed0.onnx"
    shutil.copy(mlp["path"], model)
    args = sweep_args(mlp, out, "--no-plots", "--no-latency", "--keep-models")
    r = run(*[model if a == mlp["path"] else a for a in args])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0, r.output
    assert f"the input model {model} is a file this sweep writes ({model})" in r.stderr
    assert counting.calls == [] and not (out / "runs").exists() and model.read_bytes() == mlp["path"].read_bytes()


def test_expand_checks_what_a_run_would_refuse():
    plan = SweepPlan(model="m.onnx", data=DataSpec(data="d.npz", eval_data=None, groups=["race"]), out="sw",
                     methods=("magnitude", "bilevel"), sparsities=(0.5,), base=PruneConfig(iterations=3))
    with pytest.raises(UsageError, match="bilevel in --methods is not iterative"):
        expand(plan)
    assert [r.cfg.iterations for r in expand(dataclasses.replace(plan, methods=("magnitude", "taylor")))] == [3, 3]
    with pytest.raises(UsageError, match="--disparity-weight nan"):
        sweep_mod.check_recommendation_options(None, None, float("nan"))
    sweep_mod.check_recommendation_options(0.0, 1.0, 1.0)  # the bounds themselves are fine
    sweep_mod.check_recommendation_options(None, 1.0, 0.0)


def _bad_out(tmp_path, case):
    """--out for one case of an output folder the sweep cannot fill; returns the path and the expected message."""
    out = tmp_path / "sw"
    rid = "magnitude-s0.30-seed0"
    if case == "file above":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "sub", "afile is a file, not a folder"
    if case == "cannot create":
        return "/proc/onnxfair-sweep-test", "cannot create /proc/onnxfair-sweep-test"
    if case == "dangling link":  # was "is a file, not a folder"
        out.symlink_to(tmp_path / "gone")
        return out, f"--out {out} is a symbolic link to {tmp_path / 'gone'}, which does not exist"
    out.mkdir()
    if case == "runs is a file":
        (out / "runs").write_text("x")
        return out, "runs is a file, but the sweep keeps its run reports there"
    target = out / ("runs/" + rid + ".json" if case == "run report" else case)
    target.mkdir(parents=True)
    return out, f"{target.name} is a folder, but the sweep writes a file there"


@pytest.mark.parametrize("case", ["file above", "runs is a file", "results.json", "results.csv", "report.html",
                                  "pareto.png", "groups.png", "run report", "cannot create", "dangling link"])
def test_unusable_out_is_one_line_exit_2_before_any_run(mlp, tmp_path, counting, case):
    if case == "cannot create" and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    out, message = _bad_out(tmp_path, case)
    r = run(*sweep_args(mlp, out, "--sparsities", "0.3"))
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert counting.calls == []  # refused before the first run, not after all of them


def _argmax_head(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node.append(helper.make_node("ArgMax", ["logits"], ["cls"], axis=1, keepdims=0))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("cls", TensorProto.INT64, ["N"]))
    return m


def _pinned_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The MLP behind a Reshape whose constant [1, 6] pins the batch to one row."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 6], np.int64), "pin"))
    m.graph.node.insert(0, helper.make_node("Reshape", ["x", "pin"], ["xr"]))
    m.graph.node[1].input[0] = "xr"
    return m


@pytest.mark.parametrize("case", ["argmax head", "pinned batch"])
def test_a_model_no_gradient_run_can_use_is_refused_before_the_first_run(mlp, tmp_path, case):
    """Before: the magnitude runs of the grid ran, then the first taylor run stopped the sweep with the error."""
    model = (_argmax_head if case == "argmax head" else _pinned_batch)(mlp["model"])
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "sw"
    args = ["sweep", tmp_path / "m.onnx", "--data", mlp["calib"], "--eval-data", mlp["eval"], "--groups", "race",
            "--sparsities", "0.3", "--jobs", "1", "--no-plots", "--no-latency", "--round-to", "1", "--out", out]
    r = run(*args, "--methods", "magnitude,taylor")
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    said = {"argmax head": "the model's first output holds int64 values (class indices, say), not class scores",
            "pinned batch": "a shape in the graph hard-codes the batch size"}[case]
    assert said in r.stderr
    assert not out.exists()  # nothing ran, nothing was written
    if case == "pinned batch":  # magnitude alone needs no gradient: the check is not run for it
        r = run(*args, "--methods", "magnitude")
        assert r.exit_code == 0, r.output
        # batches of its one row: prune accepts that, and so does the check (it probed three rows regardless)
        r = run(*args[:-1], tmp_path / "sw1", "--methods", "taylor", "--batch-size", "1")
        assert r.exit_code == 0, r.output


def test_a_read_only_runs_folder_is_refused_before_any_run(mlp, tmp_path, counting, monkeypatch):
    """Found only when the first run's report could not be written, before."""
    out = tmp_path / "sw"
    (out / "runs").mkdir(parents=True)
    real_access = os.access
    # the folder's mode alone would not do: the tests may run as root, whom os.access never refuses
    monkeypatch.setattr(sweep_mod.os, "access", lambda p, mode: Path(p).name != "runs" and real_access(p, mode))
    r = run(*sweep_args(mlp, out, "--sparsities", "0.3"))
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (f"error: {out / 'runs'}, where the sweep keeps its run reports, is not writable; "
                                "make it writable or choose another --out")
    assert counting.calls == []


def test_a_second_sweep_into_the_same_out_is_refused_while_the_first_runs(mlp, tmp_path, counting):
    """Two sweeps into one folder removed and rewrote each other's files (a traceback when one unlinked a model
    the other had timed)."""
    out = tmp_path / "sw"
    with sweep_mod.out_lock(out):  # the first sweep, still running
        r = run(*sweep_args(mlp, out, "--sparsities", "0.3"))
        assert r.exit_code == 2, r.output
        assert r.stderr.strip() == (f"error: another onnxfair sweep (process {os.getpid()}) is writing to --out {out}; "
                                    "wait for it to finish or choose another --out")
        assert counting.calls == []
    r = run(*sweep_args(mlp, out, "--sparsities", "0.3", "--no-plots", "--no-latency"))  # free again
    assert r.exit_code == 0, r.output
    assert len(counting.calls) == 2


def test_a_folder_made_for_the_lock_goes_when_the_sweep_writes_nothing(tmp_path):
    out = tmp_path / "new" / "sw"
    with pytest.raises(UsageError):
        with sweep_mod.out_lock(out):
            raise UsageError("nothing prunable")
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    with sweep_mod.out_lock(out):
        pass
    assert out.is_dir()  # a folder that was there stays


def test_a_lock_file_removed_between_open_and_lock_is_not_held(tmp_path, monkeypatch):
    """The sweep that held a folder made for it removes the lock file; one that had opened it just before locks
    the removed file, while a third locks a new one: both would run. The path must still name what was locked."""
    out = tmp_path / "sw"
    out.mkdir()
    real_open = os.open

    def open_then_lose(path, *a, **k):
        fd = real_open(path, *a, **k)
        os.unlink(path)  # the holder tidies up between this sweep's open and its flock
        return fd

    monkeypatch.setattr(sweep_mod.os, "open", open_then_lose)
    with pytest.raises(UsageError, match=f"is writing to --out {out}; wait for it"):
        with sweep_mod.out_lock(out):
            pass
    monkeypatch.setattr(sweep_mod.os, "open", real_open)
    with sweep_mod.out_lock(out):
        with pytest.raises(UsageError, match="another onnxfair sweep"):  # and one at a time otherwise
            with sweep_mod.out_lock(out):
                pass


def test_plots_of_an_earlier_sweep_are_removed(mlp, tmp_path, counting):
    out = tmp_path / "sw"
    r = run(*sweep_args(mlp, out, "--no-latency"))
    assert r.exit_code == 0, r.output
    assert (out / "pareto.png").is_file() and (out / "groups.png").is_file()
    # no run qualifies: no groups chart is drawn, and the earlier one (of another recommendation) goes
    r = run(*sweep_args(mlp, out, "--no-latency", "--max-disparity", "0"))
    assert r.exit_code == 3 and "no recommendation" in r.stdout, r.output  # every output written, constraint unmet
    assert r.stderr.splitlines()[-1].startswith("no run meets the constraints: no run has std_delta <= 0.0;")
    assert r.stderr.splitlines()[-1].endswith("(exit 3)")
    assert (out / "pareto.png").is_file() and not (out / "groups.png").exists()
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 1
    assert f"removed {out / 'groups.png'}" in r.stderr
    rec = json.loads((out / "results.json").read_text())["recommendation"]
    assert rec["max_disparity"] == 0 and rec["disparity_weight"] is None  # a limit reads no weight (was 1.0)
    r = run(*sweep_args(mlp, out, "--no-latency", "--no-plots"))
    assert r.exit_code == 0, r.output
    assert not (out / "pareto.png").exists() and not (out / "groups.png").exists()
    assert "data:image/png" not in (out / "report.html").read_text()
    assert len(counting.calls) == 4  # the reruns reused every run


# ---------------------------------------------------------------- the pool reports runs as they complete


def _pool_runs(n):
    return [sweep_mod.Run(f"r{i}", PruneConfig()) for i in range(n)]


def test_pool_reports_each_run_when_it_completes(monkeypatch):
    """Runs finish in the order r2, r0, r1 (each waits until the one before it has been reported): each is
    reported once, in that order, while the others still run, not all together after the last."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    after = {"r0": "r2", "r1": "r0", "r2": None}  # a run ends only once this one has been reported
    reported = {rid: threading.Event() for rid in after}
    waited_out = []

    def slow_execute(r, key):
        before = after[r.run_id]
        if before is not None and not reported[before].wait(timeout=3):
            waited_out.append(r.run_id)  # the report it waits for never came while it ran
        return r.run_id, {"key": key}, 0.0

    seen = []

    def finished(rid, rep, seconds):
        seen.append((rid, rep["key"]))
        reported[rid].set()

    monkeypatch.setattr(sweep_mod, "_execute", slow_execute)
    runs = _pool_runs(3)
    sweep_mod._run_pool(None, runs, {r.run_id: f"k-{r.run_id}" for r in runs}, 3, finished,
                        pool=ThreadPoolExecutor(3))
    assert seen == [("r2", "k-r2"), ("r0", "k-r0"), ("r1", "k-r1")]
    assert waited_out == []


def test_pool_interrupt_cancels_waiting_runs_and_does_not_wait(monkeypatch):
    """Ctrl-C (a KeyboardInterrupt in the sweep process) cancels the runs not started and returns without
    waiting for the run in progress; the run finished before it was reported."""
    from concurrent.futures import ThreadPoolExecutor
    import threading

    release = threading.Event()
    started, waited_out, seen = [], [], []

    def execute(r, key):
        started.append(r.run_id)
        if r.run_id == "r1" and not release.wait(timeout=3):  # in progress when Ctrl-C comes
            waited_out.append(r.run_id)
        return r.run_id, {}, 0.0

    def finished(rid, rep, seconds):
        seen.append(rid)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "_execute", execute)
    runs = _pool_runs(4)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod._run_pool(None, runs, {r.run_id: None for r in runs}, 1, finished, pool=ThreadPoolExecutor(1))
    release.set()  # too late for the pool to have waited on it
    assert seen == ["r0"] and waited_out == []
    assert "r2" not in started and "r3" not in started


def test_sigterm_ends_the_sweep_and_its_workers_and_keeps_finished_runs(mlp, tmp_path):
    """What timeout and CI runners send. Before: the sweep died at once and its two workers went on writing
    run reports into DIR after it had exited."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "cli.main", "sweep", str(mlp["path"]), "--data", str(mlp["calib"]), "--eval-data",
           str(mlp["eval"]), "--groups", "race", "--methods", "magnitude,bilevel", "--sparsities", "0.3,0.5,0.7",
           "--seeds", "0,1,2", "--bilevel-steps", "3000", "--round-to", "4", "--jobs", "2", "--no-plots",
           "--no-latency", "--out", str(out)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                         cwd=Path(__file__).resolve().parent.parent)
    lines = []
    for line in p.stderr:  # wait for the first finished run
        lines.append(line.rstrip("\n"))
        if line.startswith("[1/"):
            break
    p.send_signal(signal.SIGTERM)
    try:
        _, rest = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # stderr held open past the exit: workers still running
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("the sweep's workers outlived it, holding its stderr open")
    lines += rest.splitlines()
    assert p.returncode == 143, lines
    assert lines[-1] == f"terminated; finished runs are kept in {out / 'runs'}: run the same command again to resume"
    assert not any("Traceback" in line for line in lines), lines
    reports = sorted((out / "runs").glob("*.json"))
    time.sleep(2)
    assert sorted((out / "runs").glob("*.json")) == reports and len(reports) < 18  # nothing writes after the exit
    try:
        os.killpg(p.pid, 0)  # any process left in the sweep's group?
    except ProcessLookupError:
        return
    os.killpg(p.pid, signal.SIGKILL)
    pytest.fail("worker processes outlived the sweep")


def test_missing_data_is_one_line_exit_2(mlp, tmp_path):
    r = run("sweep", mlp["path"], "--methods", "magnitude", "--sparsities", "0.5", "--out", tmp_path / "sw")
    assert r.exit_code == 2 and "Missing option '--data'" in r.stderr and r.stderr.strip().count("\n") == 0
    r = run("sweep", mlp["path"], "--data", tmp_path / "calib.npz", "--groups", "", "--out", tmp_path / "sw")
    assert r.exit_code == 2 and "pass --data and --groups" in r.stderr and r.stderr.strip().count("\n") == 0
    r = run("sweep", mlp["path"], "--data", tmp_path / "nope.npz", "--groups", "race", "--out", tmp_path / "sw")
    assert r.exit_code == 2 and "data file not found" in r.stderr and r.stderr.strip().count("\n") == 0


# ------------------------------------------------------------------- against `onnxfair prune` run alone


def test_rows_equal_prune_run_alone_parallel(mlp, tmp_path):
    """The real pipeline through a 2-process pool (with deferred latency), compared with `onnxfair prune`."""
    out = tmp_path / "sw"
    r = run("sweep", mlp["path"], "--data", mlp["calib"], "--eval-data", mlp["eval"], "--groups", "race",
            "--methods", "magnitude,taylor", "--sparsities", "0.5", "--round-to", "4", "--jobs", "2",
            "--no-plots", "--out", out)
    assert r.exit_code == 0, r.output
    rows = {row["run_id"]: row for row in read_rows_csv(out / "results.csv")}
    assert set(rows) == {"magnitude-s0.50-seed0", "taylor-s0.50-seed0"}
    for method in ("magnitude", "taylor"):
        rep_path = tmp_path / f"{method}.json"
        p = run("prune", mlp["path"], "--data", mlp["calib"], "--eval-data", mlp["eval"], "--groups", "race",
                "--method", method, "--sparsity", "0.5", "--round-to", "4", "--no-latency",
                "-o", tmp_path / f"{method}.onnx", "--report", rep_path)
        assert p.exit_code == 0, p.output
        alone = result_row(run_id(method, 0.5, 0), json.loads(rep_path.read_text()))
        row = rows[run_id(method, 0.5, 0)]
        for k in ROW_FIELDS:
            if k in ("pareto", "recommended", "latency_ms", "dense_latency_ms"):
                continue
            assert row[k] == alone[k], k
        assert row["latency_ms"] > 0 and row["dense_latency_ms"] > 0  # timed after the pool, in the parent
        rep = json.loads((out / "runs" / f"{run_id(method, 0.5, 0)}.json").read_text())
        assert rep["sweep"]["threads"] == {"torch": 1, "onnxruntime": 1}  # one core per worker
        assert rep["sweep"]["latency"].startswith("measured sequentially")


def test_without_eval_data_every_seed_is_judged_on_the_same_rows(mlp, tmp_path):
    # the front compares runs of different seeds, so they must be measured on the same held-out rows: the
    # dense model's block is then identical in every run, and equals `prune --seed 3` alone
    out = tmp_path / "sw"
    r = run("sweep", mlp["path"], "--data", mlp["calib"], "--groups", "race", "--methods", "taylor",
            "--sparsities", "0.5", "--seeds", "3,4,5", "--round-to", "4", "--jobs", "1", "--no-plots",
            "--no-latency", "--out", out)
    assert r.exit_code == 0, r.output
    reps = [json.loads((out / "runs" / f"{run_id('taylor', 0.5, s)}.json").read_text()) for s in (3, 4, 5)]
    assert [rep["method"]["seed"] for rep in reps] == [3, 4, 5]
    assert all(rep["method"]["split_seed"] == 3 for rep in reps)
    assert all(rep["evaluation"]["source"] == "held-out 30% of --data (seed 3, stratified by group)" for rep in reps)
    assert reps[1]["dense"] == reps[0]["dense"] == reps[2]["dense"]
    # the settings block says what the runs used, not the options' placeholders (before: null and 0)
    prune_settings = json.loads((out / "results.json").read_text())["settings"]["prune"]
    assert prune_settings["split_seed"] == 3
    assert prune_settings["threads"] == reps[0]["sweep"]["threads"] and prune_settings["threads"]["torch"] >= 1
    p = run("prune", mlp["path"], "--data", mlp["calib"], "--groups", "race", "--method", "taylor", "--seed", "3",
            "--sparsity", "0.5", "--round-to", "4", "--no-latency", "-o", tmp_path / "t.onnx", "--report", tmp_path / "t.json")
    assert p.exit_code == 0, p.output
    alone = json.loads((tmp_path / "t.json").read_text())
    assert alone["dense"] == reps[0]["dense"] and alone["pruned"] == reps[0]["pruned"]
    # a prune run of its own reseeds its split with --seed: another seed is judged on other rows
    q = run("prune", mlp["path"], "--data", mlp["calib"], "--groups", "race", "--method", "taylor", "--seed", "4",
            "--sparsity", "0.5", "--round-to", "4", "--no-latency", "-o", tmp_path / "u.onnx", "--json", "-")
    assert json.loads(q.stdout)["dense"] != alone["dense"]
    # --split-seed replays a later seed's run exactly: its settings, its rows, its numbers
    q = run("prune", mlp["path"], "--data", mlp["calib"], "--groups", "race", "--method", "taylor", "--seed", "4",
            "--split-seed", "3", "--sparsity", "0.5", "--round-to", "4", "--no-latency", "-o", tmp_path / "u.onnx",
            "--json", "-")
    replay = json.loads(q.stdout)
    assert replay["method"]["split_seed"] == 3
    for block in ("dense", "pruned", "degradation", "evaluation", "cost"):
        assert replay[block] == reps[1][block], block
    r = run("prune", mlp["path"], "--data", mlp["calib"], "--eval-data", mlp["eval"], "--groups", "race",
            "--split-seed", "3", "--sparsity", "0.5", "-o", tmp_path / "v.onnx")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        "error: --split-seed seeds the held-out part of --data, which is judged only without --eval-data; drop "
        "--split-seed"]


@pytest.mark.parametrize("with_eval", [True, False])
def test_dense_cache_computes_once_and_changes_no_report(mlp, monkeypatch, with_eval):
    """With a DenseCache the analysis, the dense cost and the dense evaluation run once per setting; the reports
    stay equal."""
    import onnxfair.evaluate
    import onnxfair.graph
    from onnxfair.data import load_dataset

    calib = load_dataset(str(mlp["calib"]), mlp["model"], ["race"])
    eval_ds = load_dataset(str(mlp["eval"]), mlp["model"], ["race"]) if with_eval else None
    configs = [PruneConfig(method=m, sparsity=s, seed=seed, round_to=4, latency=False)
               for m in ("magnitude", "taylor") for s in (0.3, 0.6) for seed in (0, 1)]

    def strip(report):
        return {k: v for k, v in report.items() if k != "timing"}

    alone = [prune_model(mlp["model"], calib, eval_ds, cfg).report for cfg in configs]
    calls = {"analyze": 0, "dense": 0, "dense_cost": 0}
    analyze, evaluate, cost = onnxfair.graph.analyze, onnxfair.evaluate.evaluate_models, onnxfair.graph.model_cost

    def counting_analyze(*a, **k):
        calls["analyze"] += 1
        return analyze(*a, **k)

    def counting_evaluate(models, *a, **k):
        calls["dense"] += any(m is mlp["model"] for m in models)
        return evaluate(models, *a, **k)

    def counting_cost(model, *a, **k):
        calls["dense_cost"] += model is mlp["model"]
        return cost(model, *a, **k)

    monkeypatch.setattr(onnxfair.graph, "analyze", counting_analyze)
    monkeypatch.setattr(onnxfair.graph, "model_cost", counting_cost)
    monkeypatch.setattr(onnxfair.evaluate, "evaluate_models", counting_evaluate)
    cache = DenseCache()
    cached = [prune_model(mlp["model"], calib, eval_ds, cfg, cache=cache).report for cfg in configs]
    assert [strip(r) for r in cached] == [strip(r) for r in alone]
    assert calls == {"analyze": 1, "dense": 1 if with_eval else 2, "dense_cost": 1}  # held-out splits differ by seed
    assert cached[0]["dense"] is not cached[1]["dense"]  # each report owns its copy

    other = load_dataset(str(mlp["calib"]), mlp["model"], ["race"])  # other data objects: start over
    prune_model(mlp["model"], other, eval_ds, configs[0], cache=cache)
    assert calls["analyze"] == 2


def test_pareto_png_adds_a_zoom_panel_when_outliers_squeeze_the_front(tmp_path):
    from PIL import Image

    from onnxfair.plots import pareto_png

    def row(rid, acc, std, method="magnitude"):
        return {"run_id": rid, "method": method, "sparsity": 0.5, "accuracy": acc, "std_delta": std,
                "dense_accuracy": 0.9, "macs_ratio": 0.5, "pareto": False, "recommended": False}

    rows = [row(f"r{i}", 0.85 - 0.01 * i, 0.01 + 0.002 * i, "magnitude" if i % 2 else "taylor") for i in range(6)]
    rows[0]["pareto"] = rows[0]["recommended"] = True
    pareto_png(rows, "std_delta", tmp_path / "plain.png")
    rows.append(row("bad", 0.20, 0.30))  # one broken run stretches both axes
    pareto_png(rows, "std_delta", tmp_path / "zoom.png")
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "zoom.png") as b:
        assert b.size[0] > 1.4 * a.size[0]  # a second panel


def test_pareto_png_without_a_disparity_value_says_why_instead_of_empty_axes(tmp_path):
    """Before: runs judged on one group drew empty axes under a colour bar claiming 'MACs ratio 1.000 for every
    run' (their ratios were 0.33 and 0.41)."""
    from PIL import Image

    from onnxfair.plots import pareto_png

    rows = [{"run_id": f"r{i}", "method": "magnitude", "sparsity": 0.5, "accuracy": 0.8, "std_delta": None,
             "dense_accuracy": 0.9, "macs_ratio": m, "pareto": False, "recommended": False}
            for i, m in enumerate((0.33, 0.41))]
    pareto_png(rows, "std_delta", tmp_path / "none.png")
    with Image.open(tmp_path / "none.png") as im:
        pix = np.asarray(im.convert("RGB")).astype(int)
    assert pix.shape[1] > 2 * pix.shape[0]  # the short text figure, not the 8 x 6.2 plot
    coloured = (pix.max(axis=2) - pix.min(axis=2)) > 40  # a colour bar's or marker's hue; text is grey
    assert coloured.mean() < 0.001


def test_a_runs_warnings_and_achieved_sparsity_reach_the_sweep(mlp, tmp_path):
    """A sweep's runs print nothing, so prune's warnings were lost there: a 0.99 request that keeps a block of
    4 of the 16 hidden channels was a row labelled 0.99 with no word that it removed 0.75."""
    out = tmp_path / "sw"
    r = run("sweep", mlp["path"], "--data", mlp["calib"], "--eval-data", mlp["eval"], "--groups", "race",
            "--methods", "magnitude", "--sparsities", "0.5,0.99", "--round-to", "4", "--jobs", "1", "--no-plots",
            "--no-latency", "--out", out)
    assert r.exit_code == 0, r.output
    warned = [l for l in r.stderr.splitlines() if l.startswith("warning: magnitude-s0.99-seed0: ")]
    assert len(warned) == 1 and "0.750 of the channels removed, not 0.99" in warned[0], r.stderr
    assert not any(l.startswith("warning: magnitude-s0.50") for l in r.stderr.splitlines())
    rows = {row["run_id"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert (rows["magnitude-s0.50-seed0"]["achieved_sparsity"], rows["magnitude-s0.99-seed0"]["achieved_sparsity"]) == (0.5, 0.75)
    rep = json.loads((out / "runs" / "magnitude-s0.99-seed0.json").read_text())
    assert rep["warnings"] == [warned[0].split(": ", 2)[2]] and rep["structure"]["channels"]["removed"] == 12
    assert read_rows_csv(out / "results.csv") == list(rows.values())


def test_an_interrupted_sweep_leaves_no_earlier_results_beside_its_runs(mlp, tmp_path, counting, monkeypatch):
    """DIR describes the latest sweep only: stopped after a new run was written, the folder held the earlier
    sweep's results.json, report.html and plots, which did not describe that run."""
    out = tmp_path / "sw"
    assert run(*sweep_args(mlp, out)).exit_code == 0
    assert all((out / name).is_file() for name in ("results.csv", "results.json", "report.html", "pareto.png"))

    def stop_on_the_second(*a, **kw):
        if len(counting.calls) == 5:
            raise KeyboardInterrupt
        return counting(*a, **kw)

    monkeypatch.setattr(sweep_mod, "prune_model", stop_on_the_second)
    args = sweep_args(mlp, out, "--no-latency")
    r = run(*[("0.3,0.6,0.8,0.9" if a == "0.3,0.6" else a) for a in args])
    assert r.exit_code == 130, r.output
    assert "removed the earlier results in" in r.stderr
    assert not any((out / name).exists() for name in ("results.csv", "results.json", "report.html", "pareto.png",
                                                       "groups.png"))
    assert (out / "runs" / "magnitude-s0.80-seed0.json").is_file() and len(list((out / "runs").glob("*.json"))) == 5
    # the same command again reuses the five runs and writes the set
    monkeypatch.setattr(sweep_mod, "prune_model", counting)
    r = run(*[("0.3,0.6,0.8,0.9" if a == "0.3,0.6" else a) for a in args])
    assert r.exit_code == 0 and len(json.loads((out / "results.json").read_text())["rows"]) == 8


def test_signals_while_writing_the_results_wait_for_the_whole_set():
    import os
    import signal

    from cli.sweep import _signals_deferred

    before = signal.getsignal(signal.SIGINT)
    with _signals_deferred() as caught:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        written = True  # reached: neither signal stopped the block
    assert written and caught == [signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is before


def _sigint_disposition(queue):
    import signal

    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_workers_start_ignoring_ctrl_c():
    """A Ctrl-C while a spawned worker was still importing torch printed its traceback: the worker set
    SIG_IGN only in its initializer. Started inside the guard, a process ignores SIGINT from its first line."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    seen = []
    for guarded in (False, True):
        queue = ctx.Queue()
        with sweep_mod._workers_born_ignoring_ctrl_c(spawning=guarded):
            p = ctx.Process(target=_sigint_disposition, args=(queue,))
            p.start()
        seen.append(queue.get(timeout=60))
        p.join(timeout=60)
    assert seen == [False, True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("structured", [True, False])
def test_a_grid_with_nothing_to_prune_is_refused_before_any_run(tmp_path, structured):
    """Every run stopped on the same refusal, after 'running 2 runs' and with empty folders left in --out."""
    b = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(b, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "relu.onnx")
    x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=x.argmax(1), g=np.array(["a", "b", "c"] * 10))
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "relu.onnx"), "--data", str(tmp_path / "d.npz"), "--groups", "g",
                                 "--methods", "magnitude,taylor", "--sparsities", "0.5", "--out", str(tmp_path / "sw"),
                                 "--no-plots", *([] if structured else ["--unstructured"])])
    assert r.exit_code == 2 and "running" not in r.output and not (tmp_path / "sw").exists()
    assert r.output.strip().splitlines()[-1].startswith("error: nothing prunable in this graph")
