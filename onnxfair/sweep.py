"""A grid of pruning runs (method x sparsity x seed), resumable and parallel, and the accuracy/disparity trade-off.

Every run is one `prune_model` call whose report is saved as `runs/<run-id>.json` (written atomically), so
an interrupted sweep resumes where it stopped: a run whose JSON exists and whose settings and input
fingerprints match is not redone. The rows of `results.csv` / `results.json` are read from those reports,
with the same numbers `onnxfair prune` reports for the same settings.

Latency: runs in a process pool share the cores, so a latency taken inside a run would measure the
contention, not the model. Runs therefore prune and evaluate without timing, and the sweep process times
every pruned model afterwards, one at a time, with the whole machine, dense and pruned repetitions
interleaved as `onnxfair prune` does. The same holds with `jobs=1`, so every row was timed alike.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from onnxfair import __version__
from onnxfair.data import GroupedDataset, ImageOptions, load_datasets, shapes_from_rows
from onnxfair.errors import UsageError
from onnxfair.model import load_model, save_model_atomic, write_text_atomic
from onnxfair.prune import METHODS, DenseCache, PruneConfig, prunable_units, prune_model, shapes_key, unused_message
from onnxfair.report import json_safe

DISPARITIES = ("std_delta", "max_excess_gap", "accuracy_gap")

DISPARITY_DEFINITIONS = {
    "std_delta": "sample standard deviation (n-1) over groups of Δ_g = Acc_g(pruned) - Acc_g(dense)",
    "max_excess_gap": "ψ = max_g [(Acc_g(dense) - Acc_g(pruned)) - (Acc(dense) - Acc(pruned))]",
    "accuracy_gap": "accuracy gap of the pruned model, max_g Acc_g - min_g Acc_g",
}

RECOMMENDATION_RULE = (
    "Among the runs with macs_ratio <= --max-macs-ratio (when given): with --max-disparity D, the most accurate "
    "Pareto-front run whose disparity is at most D; without it, the front run with the highest "
    "accuracy - w * disparity (w = --disparity-weight, default 1; both are fractions of accuracy, so w = 1 "
    "trades one accuracy point for one point of disparity; a maximiser of this score is always on the front). "
    "Ties go to the higher accuracy, then the lower disparity, then the smaller macs_ratio, then the run id."
)

ROW_FIELDS = (
    "run_id", "method", "structured", "sparsity", "achieved_sparsity", "seed",
    "accuracy", "dense_accuracy", "accuracy_delta",
    "std_delta", "max_excess_gap", "range_delta",
    "worst_group_accuracy", "dense_worst_group_accuracy", "accuracy_gap", "dense_accuracy_gap",
    "macs", "macs_ratio", "params", "bytes", "latency_ms", "dense_latency_ms",
    "pareto", "recommended",
)

PLOTS = ("pareto.png", "groups.png")
OUTPUT_FILES = ("results.csv", "results.json", "report.html") + PLOTS


def check_recommendation_options(max_disparity: float | None, max_macs_ratio: float | None,
                                 disparity_weight: float) -> None:
    """The recommendation's options, refused before any run when out of range or not finite (JSON has no NaN)."""
    if max_macs_ratio is not None and not 0.0 < max_macs_ratio <= 1.0:
        raise UsageError(f"--max-macs-ratio {max_macs_ratio} is outside (0, 1]; it is the fraction of MACs kept")
    if max_disparity is not None and not (math.isfinite(max_disparity) and max_disparity >= 0):
        raise UsageError(f"--max-disparity {max_disparity} must be a finite number >= 0; give a fraction of accuracy, "
                         "e.g. 0.01")
    if not (math.isfinite(disparity_weight) and disparity_weight >= 0):
        raise UsageError(f"--disparity-weight {disparity_weight} must be a finite number >= 0 (the accuracy given "
                         "up per unit of disparity; 0 ignores disparity), e.g. 1")
    if max_disparity is not None and disparity_weight != 1.0:  # 1 is the default, which a script may spell out
        raise UsageError(f"--disparity-weight {disparity_weight:g} has no effect with --max-disparity, which picks "
                         "the most accurate run within the limit; drop one of the two")


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class DataSpec:
    """Where the data lives and how to read it; workers reload it from here (nothing large is pickled)."""

    data: str
    eval_data: str | None
    groups: list[str]
    label: str | None = None
    features: list[str] | None = None
    image: ImageOptions | None = None

    def load(self, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
             ) -> tuple[GroupedDataset, GroupedDataset | None]:
        calib, eval_ds = load_datasets([self.data, self.eval_data], model, self.groups, self.label, self.features,
                                       self.image, input_shapes)
        return calib, eval_ds


@dataclass
class SweepPlan:
    """The grid and everything every run shares. `base` carries the pass-through prune settings."""

    model: str
    data: DataSpec
    out: Path
    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    base: PruneConfig = field(default_factory=PruneConfig)
    jobs: int = 1
    keep_models: bool = False
    force: bool = False


@dataclass
class Run:
    run_id: str
    cfg: PruneConfig


def parse_list(text: str, kind: type, option: str) -> tuple:
    """`a,b,c` into a tuple of `kind`, duplicates dropped in order; a one-line UsageError otherwise."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"{option} is empty; give a comma-separated list")
    out = []
    for t in items:
        try:
            v = kind(t)
        except ValueError:
            raise UsageError(f"{option}: {t!r} is not a{'n integer' if kind is int else ' number'}; "
                             f"give a comma-separated list, e.g. {option} {'0,1,2' if kind is int else '0.3,0.5,0.7'}") from None
        if v not in out:
            out.append(v)
    return tuple(out)


def format_sparsity(s: float) -> str:
    """Two decimals when that is exact (0.50), else the shortest exact form, so ids never collide."""
    two = f"{s:.2f}"
    return two if float(two) == s else repr(float(s))


def run_id(method: str, sparsity: float, seed: int, structured: bool = True) -> str:
    """`fairgrape-s0.50-seed0`; unstructured runs carry `-unstr`."""
    kind = "" if structured else "-unstr"
    return f"{method}{kind}-s{format_sparsity(sparsity)}-seed{seed}"


def sweep_split_seed(plan: SweepPlan) -> int | None:
    """Without eval data every run is judged on the same held-out rows (the first seed's split), so the front
    compares runs, not the rows they happened to be judged on."""
    return None if plan.data.eval_data else int(plan.seeds[0])


def expand(plan: SweepPlan) -> list[Run]:
    """Every (method, sparsity, seed) as a validated PruneConfig, method-major order."""
    for m in plan.methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
    for s in plan.sparsities:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and 0.0 < s < 1.0):
            raise UsageError(f"sparsity {s} in --sparsities is outside (0, 1); it is the fraction removed, e.g. 0.5")
    if "bilevel" in plan.methods and plan.base.iterations > 1:  # said for a sweep: prune's line names --method
        raise UsageError("bilevel in --methods is not iterative (it trains its masks in one go); drop --iterations, "
                         "or run bilevel in a separate sweep without it")
    split_seed = sweep_split_seed(plan)
    grid = [(m, s, seed, dataclasses.replace(plan.base, method=m, sparsity=float(s), target_macs=None, seed=int(seed),
                                             split_seed=split_seed))
            for m in plan.methods for s in plan.sparsities for seed in plan.seeds]
    unused = [cfg.unused_settings() for *_, cfg in grid]
    nowhere = [name for name in unused[0] if all(name in u for u in unused)]
    if nowhere:
        raise UsageError(unused_message(grid[0][3], nowhere, "any run of this sweep"))
    runs = []
    for (m, s, seed, cfg), skip in zip(grid, unused):
        # a method-specific setting (--damping, --bilevel-steps, --loss ...) reaches the runs that read it; the
        # others run, and report, without it
        cfg = cfg.with_defaults(skip)
        cfg.validate(has_data=True)  # every run's settings, before the first one starts
        runs.append(Run(run_id(m, s, seed, cfg.structured), cfg))
    return runs


# --------------------------------------------------------------------------------- the output folder


def _folders(plan: SweepPlan) -> dict[str, Path]:
    out = Path(plan.out)
    folders = {"run reports": out / "runs"}
    if plan.keep_models:
        folders["kept models"] = out / "models"
    if plan.base.latency and not plan.keep_models:
        folders["models waiting to be timed"] = out / ".pending"
    return folders


def check_out(plan: SweepPlan, runs: Sequence[Run] | None = None) -> None:
    """Refuse, before anything is loaded or run, an output folder the sweep could not fill: --out (or a folder
    above it) a file or not writable, a sub-folder it uses a file, or a file it writes a folder. Nothing is
    created here; `prepare_out` creates the folders."""
    out = Path(plan.out)
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist; create that "
                         "folder or choose another --out")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} is not writable; choose another --out")
    else:
        above = out.absolute().parent
        while not (above.exists() or above.is_symlink()) and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise UsageError(f"--out {out} cannot be created: {above} is a file, not a folder; choose another --out")
        if not os.access(above, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} cannot be created: {above} is not writable; choose another --out")
        return  # nothing below --out exists yet
    for name in OUTPUT_FILES:  # a sweep replaces or removes these: only ever its own
        f = out / name
        if f.is_file() and not written_by_a_sweep(f):
            raise UsageError(f"--out {out} holds {name}, which no onnxfair sweep wrote and this sweep would replace; "
                             "move it or choose another --out")
    for what, folder in _folders(plan).items():
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise UsageError(f"{folder} is a file, but the sweep keeps its {what} there; move it or choose another --out")
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{folder}, where the sweep keeps its {what}, is not writable; make it writable or "
                             "choose another --out")
    for f in output_files(plan, runs):
        if f.is_dir():
            raise UsageError(f"{f} is a folder, but the sweep writes a file there; move it or choose another --out")


def written_by_a_sweep(path: Path) -> bool:
    """Whether a results file or plot in --out is a sweep's own, by the mark each carries: the JSON's
    `onnxfair_sweep` key, the CSV's header, the report's title, the PNGs' Software text (matplotlib's, on
    plots written before onnxfair marked its own, beside a sweep's results.json)."""
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            return isinstance(doc, dict) and "onnxfair_sweep" in doc
        head = path.read_bytes()[:4096]
    except (OSError, ValueError):
        return False
    if path.suffix == ".csv":
        return head.startswith(b"run_id,method,")
    if path.suffix == ".html":
        return b"<title>onnxfair sweep</title>" in head
    if b"tEXtSoftware\x00onnxfair " in head:
        return True
    # a plot of a sweep from before the mark: matplotlib's own tag, beside that sweep's results.json
    return b"tEXtSoftware\x00Matplotlib" in head and written_by_a_sweep(path.with_name("results.json"))


def output_files(plan: SweepPlan, runs: Sequence[Run] | None = None) -> list[Path]:
    """Every file the sweep may write in --out: results, plots, each run's report and model."""
    out = Path(plan.out)
    files = [out / name for name in OUTPUT_FILES]
    for r in runs if runs is not None else expand(plan):
        files.append(_run_path(plan, r.run_id))
        files += [_model_path(plan, r.run_id, pending) for pending in (False, True)]
    return files


def foreign_models(plan: SweepPlan, result: SweepResult) -> list[Path]:
    """Model files in --out's models folder that this sweep did not keep (an earlier sweep's, with another grid
    or with --keep-models when this one has none): left in place, but a reader must not take them for its own."""
    folder = Path(plan.out) / "models"
    ours = {_model_path(plan, rid, pending=False) for rid in result.reports} if plan.keep_models else set()
    return sorted(p for p in folder.glob("*.onnx") if p not in ours) if folder.is_dir() else []


def _check_prunable(plan: SweepPlan, runs: Sequence[Run], model: onnx.ModelProto, calib: GroupedDataset,
                    eval_ds: GroupedDataset | None, cache: DenseCache) -> None:
    """Refuse a grid whose runs would all stop on the same 'nothing prunable', or whose gradient runs would
    all stop on a model the interpreter cannot backpropagate through; the analysis is kept in `cache` for the
    runs of this process, under the key prune uses."""
    from onnxfair.graph import analyze
    from onnxfair.pruning_steps import check_gradients

    shapes = shapes_from_rows(model, plan.base.input_shapes, [calib, eval_ds])
    cfg = dataclasses.replace(plan.base, input_shapes=shapes)
    cache.bind(model, calib, eval_ds)
    key = ("analysis", shapes_key(shapes), tuple(cfg.ignore))
    _an, dense, _units = prunable_units(model, cfg, lambda: cache.get(key, lambda: analyze(
        model, input_shapes=shapes or None, ignore=cfg.ignore)))
    if any(r.cfg.uses_gradients for r in runs):
        check_gradients(dense, calib, cfg.device, cfg.batch_size)


LOCK_FILE = ".sweep.lock"


@contextlib.contextmanager
def out_lock(out: str | Path):
    """Hold --out for one sweep at a time: two sweeps into one folder would remove and rewrite each other's
    files mid-run. A second one is refused (UsageError), not queued. The lock file stays, except in a folder
    made only for it and left empty (removed again, so a refused or failed sweep leaves nothing); a sweep
    that locked a file since removed checks the path still names it, so two can never both hold --out.
    Where the file system has no locks (or on Windows), sweeps are not serialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out = Path(out)
    path = out / LOCK_FILE
    made = [d for d in [out, *out.parents] if not d.exists()]  # the folders mkdir creates, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except PermissionError:  # another user's lock file in a shared folder: a read-only descriptor locks too
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror or exc}; choose another --out") from None
    try:
        held: bool | None = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
        except OSError:  # ENOLCK, EOPNOTSUPP: this file system cannot lock
            held = None
        if held is None:
            yield
            return
        if held:
            try:
                held = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:  # removed by the sweep that held it: another may have locked a new one
                held = False
        if not held:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise UsageError(f"another onnxfair sweep{f' (process {holder})' if holder.isdigit() else ''} is writing "
                             f"to --out {out}; wait for it to finish or choose another --out")
        with contextlib.suppress(OSError):  # the holder's process id, for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # --out removed meanwhile: nothing to tidy
                if made and [p.name for p in out.iterdir()] == [LOCK_FILE]:
                    path.unlink()
                    for d in made:
                        with contextlib.suppress(OSError):  # one another process wrote in stays
                            d.rmdir()
    finally:
        os.close(fd)


def prepare_out(plan: SweepPlan) -> None:
    """Create --out and the folders the runs write to; a failure is one line (UsageError), not a traceback."""
    for folder in [Path(plan.out), *_folders(plan).values()]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {folder}: {exc.strerror or exc}; choose another --out") from None


# ---------------------------------------------------------------------------------- resumability keys


def _normalise(obj):
    """What the object reads back as from JSON (tuples become lists), so stored and fresh keys compare."""
    return json.loads(json.dumps(json_safe(obj), default=_jsonable, allow_nan=False))


def _jsonable(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rows_sha256(ds: GroupedDataset) -> str:
    """Hash of the rows as loaded (inputs, labels, groups): what a file hash misses, such as the images an
    image manifest names."""
    h = hashlib.sha256()
    for name in sorted(ds.inputs):
        arr = np.ascontiguousarray(ds.inputs[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.data)
    for arr in (ds.y, ds.group_ids):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).data)
    h.update("\n".join(ds.group_labels).encode())
    return h.hexdigest()


def inputs_fingerprint(plan: SweepPlan, calib: GroupedDataset, eval_ds: GroupedDataset | None) -> dict:
    """Content hashes of the model and data files, of the rows loaded from them, and the data options: a
    changed input, an image a manifest names included, redoes every run."""
    d = plan.data
    return _normalise({
        "model_sha256": file_sha256(plan.model),
        "data_sha256": file_sha256(d.data),
        "eval_data_sha256": file_sha256(d.eval_data) if d.eval_data else None,
        "rows_sha256": [rows_sha256(calib), rows_sha256(eval_ds) if eval_ds is not None else None],
        "groups": list(d.groups), "label": d.label, "features": d.features,
        "image": dataclasses.asdict(d.image) if d.image else None,
    })


def run_key(cfg: PruneConfig, fingerprint: dict) -> dict:
    """The settings a stored run must match to be reused. Latency on/off is left out: it is added later."""
    settings = dataclasses.asdict(cfg)
    settings.pop("latency")
    return _normalise({"prune": settings, "inputs": fingerprint, "onnxfair": __version__})


# ----------------------------------------------------------------------------------------- one run


@dataclass
class _Worker:
    """What a worker process needs; it loads model and data itself once."""

    plan: SweepPlan
    threads: int = 0  # torch and onnxruntime threads per run when the settings leave them at 0


_STATE: dict = {}


def _init_worker(setup: _Worker) -> None:
    import signal

    # Ctrl-C reaches the whole process group: the sweep process handles it (and ends the workers), so a worker
    # does not print a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the sweep process's handler: ending a worker ends it quietly
    if setup.threads:
        os.environ["OMP_NUM_THREADS"] = str(setup.threads)
    model = load_model(setup.plan.model)
    calib, eval_ds = setup.plan.data.load(model, setup.plan.base.input_shapes)
    _STATE.update(plan=setup.plan, model=model, calib=calib, eval_ds=eval_ds, threads=setup.threads,
                  cache=DenseCache())


def _execute(run: Run, key: dict) -> tuple[str, dict, float]:
    """Prune and evaluate one configuration (latency deferred); write its model if needed and its JSON.

    The process's DenseCache keeps the channel analysis and the dense evaluation from run to run.
    """
    plan: SweepPlan = _STATE["plan"]
    t0 = time.perf_counter()
    cfg = dataclasses.replace(run.cfg, latency=False, threads=run.cfg.threads or _STATE.get("threads", 0))
    result = prune_model(_STATE["model"], _STATE["calib"], _STATE["eval_ds"], cfg, cache=_STATE.get("cache"))
    report = result.report
    model_path = _model_path(plan, run.run_id, pending=run.cfg.latency and not plan.keep_models)
    written = None
    if plan.keep_models or run.cfg.latency:
        save_model_atomic(result.model, model_path, protect=[plan.model])
        written = file_sha256(model_path)  # ties the file to this report: a resume reuses only this file
    report["input"] = {"model": plan.model, "data": plan.data.data, "eval_data": plan.data.eval_data,
                       "output": str(model_path) if plan.keep_models else None}
    import torch

    report["sweep"] = {"run_id": run.run_id, "key": key, "latency": "pending" if run.cfg.latency else "off",
                       # an integer either way: 0 is onnxruntime's own default, as --threads 0 means
                       "threads": {"torch": torch.get_num_threads(), "onnxruntime": cfg.threads},
                       "model_sha256": written}
    write_json_atomic(report, _run_path(plan, run.run_id))
    return run.run_id, report, time.perf_counter() - t0


def _run_path(plan: SweepPlan, rid: str) -> Path:
    return Path(plan.out) / "runs" / f"{rid}.json"


def _model_path(plan: SweepPlan, rid: str, pending: bool) -> Path:
    return Path(plan.out) / (".pending" if pending else "models") / f"{rid}.onnx"


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    return write_text_atomic(json.dumps(json_safe(obj), indent=2, default=_jsonable, allow_nan=False) + "\n", path)


def load_finished(plan: SweepPlan, run: Run, key: dict) -> dict | None:
    """The stored report of `run` if it can be reused as is (or after timing its kept model), else None."""
    path = _run_path(plan, run.run_id)
    if plan.force or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("sweep", {}).get("key") != key:
        return None
    if "pruned" not in report or "cost" not in report:
        return None
    kept = _model_path(plan, run.run_id, pending=False)
    if plan.keep_models and not _is_runs_model(kept, report):
        return None
    if run.cfg.latency and report.get("latency") is None and _existing_model(plan, run.run_id, report) is None:
        return None
    return report


def _is_runs_model(path: Path, report: dict) -> bool:
    """Whether `path` holds the model this run's report describes (an earlier sweep with other settings may
    have left a file of the same name)."""
    digest = report.get("sweep", {}).get("model_sha256")
    return digest is not None and path.is_file() and file_sha256(path) == digest


def _existing_model(plan: SweepPlan, rid: str, report: dict) -> Path | None:
    for pending in (False, True):
        p = _model_path(plan, rid, pending)
        if _is_runs_model(p, report):
            return p
    return None


# ----------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    rows: list[dict]
    reports: dict[str, dict]
    recommended: str | None
    recommendation: str
    reused: list[str]
    computed: list[str]


def run_sweep(
    plan: SweepPlan,
    model: onnx.ModelProto,
    calib: GroupedDataset,
    eval_ds: GroupedDataset | None,
    progress: Callable[[str], None] = lambda s: None,
    disparity: str = "std_delta",
    max_disparity: float | None = None,
    max_macs_ratio: float | None = None,
    disparity_weight: float = 1.0,
) -> SweepResult:
    """Run the grid (reusing finished runs), time the pruned models, and return the rows with the front."""
    if disparity not in DISPARITIES:
        raise UsageError(f"unknown --disparity {disparity!r}; choose from {', '.join(DISPARITIES)}")
    check_recommendation_options(max_disparity, max_macs_ratio, disparity_weight)
    runs = expand(plan)
    out = Path(plan.out)
    check_out(plan, runs)
    cache = DenseCache()
    _check_prunable(plan, runs, model, calib, eval_ds, cache)  # before any folder is made or run announced
    prepare_out(plan)
    fingerprint = inputs_fingerprint(plan, calib, eval_ds)
    keys = {r.run_id: run_key(r.cfg, fingerprint) for r in runs}

    reports: dict[str, dict] = {}
    for r in runs:
        rep = load_finished(plan, r, keys[r.run_id])
        if rep is not None:
            reports[r.run_id] = rep
    reused = [r.run_id for r in runs if r.run_id in reports]
    todo = [r for r in runs if r.run_id not in reports]
    total = len(runs)
    if reused:
        progress(f"{len(reused)} of {total} runs already done in {out / 'runs'}; reusing them")
    jobs = max(1, min(plan.jobs, len(todo)))
    if todo:
        _remove_earlier_results(out, progress)
        progress(f"running {len(todo)} runs on {jobs} process{'es' if jobs > 1 else ''}")
    done = len(reused)

    def finished(rid: str, rep: dict, seconds: float) -> None:
        nonlocal done
        done += 1
        reports[rid] = rep
        progress(f"[{done}/{total}] {rid} in {seconds:.1f}s: accuracy {_pct(rep['pruned']['overall']['accuracy'])}%, "
                 f"{disparity} {_pct(_disparity_value(rep, disparity))} pts, "
                 f"MACs x{rep['cost']['macs_ratio']:.3f}")
        for w in rep.get("warnings", []):  # the runs print nothing themselves; their report keeps what prune warns
            progress(f"warning: {rid}: {w}")

    if jobs == 1:
        _STATE.update(plan=plan, model=model, calib=calib, eval_ds=eval_ds, cache=cache)
        try:
            for r in todo:
                finished(*_execute(r, keys[r.run_id]))
        finally:
            _STATE.clear()
    elif todo:
        _run_pool(plan, todo, keys, jobs, finished)

    _time_models(plan, runs, reports, model, eval_ds if eval_ds is not None else calib, progress)
    pending = out / ".pending"
    if pending.is_dir() and not any(pending.iterdir()):
        pending.rmdir()

    # a run reused from a sweep that timed it keeps its latency in its report, but the rows follow this sweep's
    # setting: with --no-latency no row shows one, rather than some rows showing an earlier sweep's timing
    rows = [result_row(r.run_id, reports[r.run_id], latency=plan.base.latency) for r in runs]
    rec, why = mark_front(rows, disparity, max_disparity, max_macs_ratio, disparity_weight)
    return SweepResult(rows, reports, rec, why, reused, [r.run_id for r in todo])


def _remove_earlier_results(out: Path, progress: Callable[[str], None]) -> None:
    """Remove the results, report and plots of the sweep before this one, which computes new runs: were it
    stopped, they would sit beside run reports they do not describe (DIR describes the latest sweep only)."""
    stale = [out / name for name in OUTPUT_FILES if (out / name).is_file()]
    for f in stale:
        f.unlink()
    if stale:
        progress(f"removed the earlier results in {out} ({', '.join(f.name for f in stale)}); this sweep writes its "
                 "own when its runs are done")


def _run_pool(plan: SweepPlan, todo: list[Run], keys: dict, jobs: int, finished: Callable, pool=None) -> None:
    """Run `todo` on `jobs` worker processes and call `finished` for each run as soon as it completes.

    A run's error stops the sweep: runs not started are cancelled, runs in progress finish (and are kept on
    disk for the resume). On KeyboardInterrupt the runs not started are cancelled and the workers stopped at
    once; every run already reported is on disk. `pool` (an Executor) replaces the process pool in tests.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    own_pool = pool is None
    if pool is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(_Worker(plan, threads=1),))
    order: dict = {}
    try:
        with _workers_born_ignoring_ctrl_c(spawning=own_pool):
            for i, r in enumerate(todo):  # submit starts the worker processes
                order[pool.submit(_execute, r, keys[r.run_id])] = i
        pending = set(order)
        while pending:
            complete, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(complete, key=order.__getitem__):
                finished(*fut.result())  # re-raises a run's error here; finished runs stay on disk
    except KeyboardInterrupt:
        _stop_pool(pool)
        raise
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _workers_born_ignoring_ctrl_c(spawning: bool):
    """Ignore Ctrl-C in this process while it starts workers, which inherit the ignoring through exec: a
    worker that set it only in its initializer printed a traceback for a Ctrl-C in the seconds it spends
    importing torch. A Ctrl-C in that short window is lost; the workers start in milliseconds."""
    import signal
    import threading

    if not spawning or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_pool(pool) -> None:
    """Cancel the runs not started and end the worker processes now, without waiting for the runs in progress
    (their outputs are written atomically, so an ended run leaves nothing half-written)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in workers:
        if p.is_alive():
            p.terminate()
    for p in workers:
        p.join(timeout=5)
    # let the pool's manager thread finish closing its wake-up pipe before the interpreter exits: else
    # concurrent.futures' exit hook may write to the pipe as it closes ("Bad file descriptor" on stderr)
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(timeout=5)


def _time_models(plan: SweepPlan, runs: list[Run], reports: dict[str, dict], model: onnx.ModelProto,
                 ds: GroupedDataset, progress: Callable[[str], None]) -> None:
    """Latency of every pruned model still untimed, sequentially in this process, interleaved with the dense one."""
    need = [r for r in runs if r.cfg.latency and reports[r.run_id].get("latency") is None]
    if not need:
        return
    from onnxfair.prune import latency_summary
    from onnxfair.runtime import create_session, latency_inputs, measure_latency, timing_batch

    base = plan.base
    progress(f"timing {len(need)} pruned models one at a time (batch {base.latency_batch})")
    dense = create_session(model, base.device, base.input_shapes or None, base.threads)
    for r in need:
        path = _existing_model(plan, r.run_id, reports[r.run_id])
        if path is None:  # cannot happen: load_finished and _execute guarantee a model file
            raise UsageError(f"the model of run {r.run_id} is missing; rerun the sweep with --force")
        pruned = create_session(load_model(path, check=False), base.device, base.input_shapes or None, base.threads)
        d, p = measure_latency([dense, pruned], latency_inputs(ds.inputs, timing_batch([dense, pruned], base.latency_batch)))
        rep = reports[r.run_id]
        rep["latency"] = latency_summary(d, p)
        rep["method"]["latency"] = True
        rep["sweep"]["latency"] = "measured sequentially by the sweep process after pruning"
        write_json_atomic(rep, _run_path(plan, r.run_id))
        if path.parent.name == ".pending":
            path.unlink()


# ---------------------------------------------------------------------------------- rows and the front


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _disparity_value(report: dict, metric: str) -> float | None:
    if metric == "accuracy_gap":
        return report["pruned"]["disparity"]["accuracy_gap"]
    return report["degradation"][metric]


def result_row(rid: str, report: dict, latency: bool = True) -> dict:
    """One results-table row, every value read straight from the run's prune report (its latency only when
    `latency`)."""
    m, c = report["method"], report["cost"]
    d, p, g = report["dense"], report["pruned"], report["degradation"]
    lat = report.get("latency") if latency else None
    return {
        "run_id": rid,
        "method": m["method"],
        "structured": bool(m["structured"]),
        "sparsity": m["sparsity"],
        "achieved_sparsity": _achieved_sparsity(report),
        "seed": m["seed"],
        "accuracy": p["overall"]["accuracy"],
        "dense_accuracy": d["overall"]["accuracy"],
        "accuracy_delta": g["overall_delta"],
        "std_delta": g["std_delta"],
        "max_excess_gap": g["max_excess_gap"],
        "range_delta": g["range_delta"],
        "worst_group_accuracy": p["disparity"]["worst_group_accuracy"],
        "dense_worst_group_accuracy": d["disparity"]["worst_group_accuracy"],
        "accuracy_gap": p["disparity"]["accuracy_gap"],
        "dense_accuracy_gap": d["disparity"]["accuracy_gap"],
        "macs": c["macs_pruned"],
        "macs_ratio": c["macs_ratio"],
        "params": c["params_pruned"],
        "bytes": c["bytes_pruned"],
        "latency_ms": lat["pruned"]["median_ms"] if lat else None,
        "dense_latency_ms": lat["dense"]["median_ms"] if lat else None,
        "pareto": False,
        "recommended": False,
    }


def _achieved_sparsity(report: dict) -> float | None:
    """The fraction of channels (structured) or weights removed, which rounding and floors can set apart
    from the requested --sparsity (a request of 0.999 keeps a block of every group)."""
    st = report.get("structure", {})
    part = st.get("channels") or st.get("weights")
    return None if part is None else part.get("sparsity")


def _valid(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which (accuracy, disparity) points are non-dominated: accuracy maximised, disparity minimised.

    A point is on the front iff no other point is at least as good in both and strictly better in one.
    Exact duplicates do not dominate each other (both stay on the front); points with a missing or
    non-finite coordinate are never on it and dominate nothing.
    """
    ok = [i for i, (a, d) in enumerate(points) if _valid(a) and _valid(d)]
    front = [False] * len(points)
    for i in ok:
        ai, di = points[i]
        front[i] = not any(
            points[j][0] >= ai and points[j][1] <= di and (points[j][0] > ai or points[j][1] < di) for j in ok if j != i
        )
    return front


def recommend(
    rows: Sequence[dict],
    metric: str = "std_delta",
    max_disparity: float | None = None,
    max_macs_ratio: float | None = None,
    disparity_weight: float = 1.0,
) -> tuple[int | None, str]:
    """Index of the recommended row (RECOMMENDATION_RULE) and a sentence saying why, or None and why not."""
    cand = [i for i, r in enumerate(rows) if _valid(r["accuracy"]) and _valid(r[metric])
            and (max_macs_ratio is None or r["macs_ratio"] <= max_macs_ratio)]
    if not cand:
        if max_macs_ratio is not None and any(_valid(r[metric]) for r in rows):
            return None, f"no run has macs_ratio <= {max_macs_ratio}; raise --max-macs-ratio or add higher sparsities"
        return None, f"no run has a value for {metric} (std_delta needs at least two groups with rows)"
    front = pareto_front([(rows[i]["accuracy"], rows[i][metric]) for i in cand])
    front_rows = [i for i, f in zip(cand, front) if f]

    def tiebreak(i: int) -> tuple:
        r = rows[i]
        return (-r["accuracy"], r[metric], r["macs_ratio"], r["run_id"])

    limit = f" with macs_ratio <= {max_macs_ratio}" if max_macs_ratio is not None else ""
    if max_disparity is not None:
        ok = [i for i in front_rows if rows[i][metric] <= max_disparity]
        if not ok:
            best = min(front_rows, key=lambda i: (rows[i][metric], -rows[i]["accuracy"]))
            return None, (f"no run{limit} has {metric} <= {max_disparity}; the lowest is "
                          f"{rows[best][metric]:.4g} ({rows[best]['run_id']})")
        pick = min(ok, key=tiebreak)
        return pick, f"the most accurate run{limit} whose {metric} is at most {max_disparity}"
    pick = min(front_rows, key=lambda i: (-(rows[i]["accuracy"] - disparity_weight * rows[i][metric]),) + tiebreak(i))
    return pick, f"the run{limit} with the highest accuracy - {disparity_weight:g} x {metric}"


def mark_front(
    rows: list[dict],
    metric: str = "std_delta",
    max_disparity: float | None = None,
    max_macs_ratio: float | None = None,
    disparity_weight: float = 1.0,
) -> tuple[str | None, str]:
    """Set `pareto` and `recommended` in place; return the recommended run id and why. The front is that of the
    runs within --max-macs-ratio (all runs without it), the runs the recommendation chooses from, so the
    recommended run is always marked on it."""
    within = [i for i, r in enumerate(rows) if max_macs_ratio is None or r["macs_ratio"] <= max_macs_ratio]
    for r in rows:
        r["pareto"] = r["recommended"] = False
    for i, f in zip(within, pareto_front([(rows[i]["accuracy"], rows[i][metric]) for i in within])):
        rows[i]["pareto"] = f
    idx, why = recommend(rows, metric, max_disparity, max_macs_ratio, disparity_weight)
    if idx is None:
        return None, why
    rows[idx]["recommended"] = True
    return rows[idx]["run_id"], why


# ------------------------------------------------------------------------------------------- outputs


def rows_csv(rows: Iterable[dict]) -> str:
    """CSV text; floats at full precision (repr), missing values empty, booleans true/false."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else str(r[k]).lower() if isinstance(r[k], bool) else r[k]) for k in ROW_FIELDS})
    return buf.getvalue()


def read_rows_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a results.csv with their types restored (for tests and scripts)."""
    ints = {"seed", "macs", "params", "bytes"}
    bools = {"structured", "pareto", "recommended"}
    texts = {"run_id", "method"}
    out = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for k, v in raw.items():
                if k in texts:
                    row[k] = v
                elif v == "":
                    row[k] = None
                elif k in bools:
                    row[k] = v == "true"
                elif k in ints:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def sweep_summary(plan: SweepPlan, result: SweepResult, disparity: str, max_disparity: float | None,
                  max_macs_ratio: float | None, disparity_weight: float) -> dict:
    """The results.json document: settings, conventions, the recommendation and one row per run."""
    base = dataclasses.asdict(plan.base)
    for k in ("method", "sparsity", "target_macs", "seed"):
        base.pop(k)
    first = next(iter(result.reports.values()), {})
    # what the runs used, not the option's placeholders (0 threads = default, no split seed = per run)
    base["split_seed"] = sweep_split_seed(plan)
    base["threads"] = first.get("sweep", {}).get("threads", base["threads"])
    conventions = first.get("pruned", {}).get("conventions", {})
    return _normalise({
        "onnxfair_sweep": 1,
        "settings": {
            "model": plan.model, "data": plan.data.data, "eval_data": plan.data.eval_data, "groups": plan.data.groups,
            "evaluation": first.get("evaluation"),
            "methods": list(plan.methods), "sparsities": list(plan.sparsities), "seeds": list(plan.seeds),
            "prune": base, "jobs": plan.jobs, "keep_models": plan.keep_models,
            # what ran: --jobs caps the pool at the runs to compute (none when every run was reused)
            "processes": min(plan.jobs, len(result.computed)),
            "latency": ("measured sequentially in the sweep process after all runs, dense and pruned interleaved"
                        if plan.base.latency else "off"),
            "versions": first.get("method", {}).get("versions"),
        },
        "disparity": {"metric": disparity, "definition": DISPARITY_DEFINITIONS[disparity]},
        "pareto": "accuracy (maximised) against disparity (minimised); a run is on the front iff no other run is "
                  "at least as good in both and strictly better in one",
        "recommendation": {
            "run_id": result.recommended, "why": result.recommendation, "rule": RECOMMENDATION_RULE,
            "max_disparity": max_disparity, "max_macs_ratio": max_macs_ratio,
            "disparity_weight": None if max_disparity is not None else disparity_weight,  # not read with a limit
        },
        "conventions": conventions,
        "reused": result.reused,
        "computed": result.computed,
        "rows": result.rows,
    })


def write_results(out: str | os.PathLike, summary: dict) -> tuple[Path, Path]:
    """results.csv and results.json in `out`, both written atomically."""
    out = Path(out)
    c = write_text_atomic(rows_csv(summary["rows"]), out / "results.csv")
    j = write_json_atomic(summary, out / "results.json")
    return c, j


def format_rows(rows: Sequence[dict], metric: str) -> str:
    """Terminal table of the sweep: * marks the Pareto front, <- the recommended run."""
    w = max([32] + [len(r["run_id"]) + 1 for r in rows])  # whole run ids: cut ones can read alike
    head = (f"{'run':<{w}}{'acc%':>8}{'Δacc':>8}{metric[:14]:>15}{'worst%':>8}{'gap':>7}{'MACs':>7}{'ms':>8}  front")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}"
        lines.append(
            f"{r['run_id']:<{w}}{_pct(r['accuracy']):>8}{_pct(r['accuracy_delta']):>8}{_pct(r[metric]):>15}"
            f"{_pct(r['worst_group_accuracy']):>8}{_pct(r['accuracy_gap']):>7}{r['macs_ratio']:>7.3f}{ms:>8}  "
            f"{'*' if r['pareto'] else ' '}{' <- recommended' if r['recommended'] else ''}"
        )
    return "\n".join(lines)
