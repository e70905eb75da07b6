"""onnxruntime sessions: provider choice and check, batched inference, latency."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import onnx

from onnxfair.errors import ModelError, NoOutputsError, RuntimeUnavailableError, UsageError
from onnxfair.model import batch_axis_hint, batch_candidates, fix_input_shapes, fixed_batch, input_specs, make_batch_dynamic

_WARNED: set[str] = set()


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailableError(
            "onnxruntime is not installed; install it with pip install 'onnxfair[cpu]' (or 'onnxfair[gpu]' for CUDA)"
        ) from None
    return onnxruntime


_COLLECTORS: list[list[str]] = []


@contextlib.contextmanager
def collecting_warnings(into: list[str]) -> Iterator[list[str]]:
    """Also keep, in `into`, every warn_once message given inside the block, printed before or not."""
    _COLLECTORS.append(into)
    try:
        yield into
    finally:
        del _COLLECTORS[next(i for i, c in enumerate(_COLLECTORS) if c is into)]


def keeping_warnings(progress: Callable[[str], None], into: list[str]) -> Callable[[str], None]:
    """`progress` that also keeps each "warning: ..." line: the report carries them, so a sweep (whose runs
    print nothing) and a pipeline reading the JSON see what the terminal would have shown."""
    def say(line: str) -> None:
        if line.startswith("warning: ") and line[len("warning: "):] not in into:
            into.append(line[len("warning: "):])
        progress(line)

    return say


def warn_once(message: str) -> None:
    """Print a warning once per process (a data reader or a session may be built many times)."""
    for into in _COLLECTORS:
        if message not in into:
            into.append(message)
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


@dataclass
class Session:
    """An onnxruntime session over a batch-dynamic copy of the model, with the provider actually used."""

    session: object
    provider: str
    threads: int
    input_names: list[str]
    batch_dynamic: bool
    declared_batch: int = 1  # the model's own dim 0 (1 when symbolic); once a hard-coded batch is found, that one
    candidates: tuple[int, ...] = ()  # batches the graph may hard-code (model.batch_candidates)
    exported_batch: int | None = None  # dim 0 the model itself fixed, before it was made dynamic

    def run(self, inputs: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
        """First output for all rows, in batches. A graph whose shapes hard-code the batch runs in batches of
        the size the model declares, the last one padded with copies of its final row (dropped again)."""
        n = next(iter(inputs.values())).shape[0]
        step = batch_size if self.batch_dynamic else self.declared_batch
        outs = []
        start = 0
        while start < n:
            feed = {k: inputs[k][start : start + step] for k in self.input_names}
            rows = min(step, n - start)
            if not self.batch_dynamic and rows < step:
                feed = {k: np.concatenate([v, np.repeat(v[-1:], step - rows, axis=0)]) for k, v in feed.items()}
            out, error = self._run_rows(feed)
            if error is not None and self.batch_dynamic and rows == 1 and out is not None:
                # a head that squeezes every unit axis loses the batch axis at one row: the row is run twice
                out, error = self._run_rows({k: np.repeat(v, 2, axis=0) for k, v in feed.items()})
            if error is None and self.batch_dynamic and start == 0 and self.rows_interact(feed, out):
                step = self.declared_batch
                continue
            if error is not None:
                columns = out is not None and out.ndim and batch_axis_hint({k: v.shape for k, v in feed.items()},
                                                                            out.shape[0])
                if self.batch_dynamic and start == 0 and not columns and self.pin_batch(feed):
                    # A Reshape constant that hard-codes the batch defeats the dynamic batch: it fails, or it
                    # folds the rows together.
                    step = self.declared_batch
                    continue
                raise ModelError(f"onnxruntime failed to run the model: {error}; {RUN_FIX}")
            outs.append(out[:rows])
            start += step
        return np.concatenate(outs, axis=0)

    def _run_rows(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray | None, str | None]:
        """The first output on `feed`, and what is wrong when it has not one row per fed row (None if not)."""
        fed = len(next(iter(feed.values())))
        try:
            out = self.session.run(None, feed)[0]
        except Exception as exc:
            return None, ort_message(exc)
        if out.ndim == 0 and fed == 1:  # a head that squeezes every unit axis gives a row a scalar
            out = out.reshape(1)
        if out.ndim and out.shape[0] == fed:
            return out, None
        return out, (f"it returned {out.shape[0] if out.ndim else 'no'} rows for a batch of {fed}"
                     + (batch_axis_hint({k: v.shape for k, v in feed.items()}, out.shape[0]) if out.ndim else ""))

    def rows_interact(self, feed: dict[str, np.ndarray], out: np.ndarray) -> bool:
        """Whether the model gives other outputs when its rows run together than when they run k at a time,
        k the batch it was exported for (1 when symbolic): statistics over the batch, say, such as a
        per-image standardisation written for one image, or a normalisation whose axes include the batch. If
        so the session runs k rows at a time from now on (with a warning) and True is returned."""
        k = self.exported_batch or 1
        fed = len(out)
        if fed < 2 * k or out.dtype.kind not in "fiub":  # strings or objects: nothing to compare numerically
            return False
        probe = 2 * k
        try:
            parts = [self.session.run(None, {n: v[i : i + k] for n, v in feed.items()})[0] for i in range(0, probe, k)]
        except Exception:  # a graph that runs any batch but k: nothing to compare
            return False
        row = (k, *out.shape[1:])
        if any(p.size != int(np.prod(row)) for p in parts):
            return False
        alone = np.concatenate([p.reshape(row) for p in parts])  # a head that squeezed a batch of 1 lost its axis
        finite = np.abs(alone[np.isfinite(alone)])
        if np.allclose(out[:probe], alone, rtol=1e-4, atol=1e-5 * max(1.0, float(finite.max()) if finite.size else 1.0),
                       equal_nan=True):  # NaN rows are refused later, with their count; they do not interact
            return False
        self.declared_batch, self.batch_dynamic = k, False
        warn_once(f"the model gives other outputs when its rows run together than when they run {k} at a time"
                  f"{', as it was exported' if self.exported_batch else ''} (its rows affect one another); running "
                  f"{k} row{'s' * (k > 1)} at a time")
        return True

    def pin_batch(self, feed: dict[str, np.ndarray]) -> bool:
        """Whether a failure on `feed` comes from its batch size: the first row repeated to a candidate batch runs,
        repeated to the batch of `feed` it fails (so neither the data nor the model itself is the cause). If so
        the session runs that batch from now on (with a warning) and True is returned."""
        def runs(n: int) -> bool:
            return self._run_rows({k: np.repeat(v[:1], n, axis=0) for k, v in feed.items()})[1] is None

        fed = len(next(iter(feed.values())))
        pinned = next((b for b in dict.fromkeys((self.declared_batch, *self.candidates)) if b != fed and runs(b)), None)
        if pinned is None or runs(fed):
            return False
        self.declared_batch, self.batch_dynamic = pinned, False
        _warn_pinned(pinned)
        return True


RUN_FIX = "fix the model or the data so that onnxruntime runs it (inputs in the ranges the graph expects)"


def ort_message(exc: BaseException) -> str:
    """An onnxruntime exception as one short line: no status prefix, no C++ source location or signature."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(exc).split()))
    text = re.sub(r"\S+\.(?:cc|cpp|h):\d+ .*?(?=\S+ (?:[=!<>]=? \S+ )?was false\.)", "", text)
    text = re.sub(r"\S+\.(?:cc|cpp|h):\d+ [\w:~]+\([^)]*\) ", "", text)  # a C++ location and signature
    text = re.sub(r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: ",
                  lambda m: f"{m[1]} node{' ' + repr(m[2]) if m[2] else ''}: ", text)
    return text[:400]


def _warn_pinned(declared: int) -> None:
    warn_once(f"model fails on batches other than {declared} (a shape is hard-coded); "
              f"running {declared} row{'s' if declared > 1 else ''} at a time")


def _interpreter_reason(model: onnx.ModelProto) -> str:
    """The interpreter's refusal of the same model, which names the op and why (onnxruntime's own message
    may only name a failed check in its source), or ''."""
    from onnxfair.interpret import unsupported_ops

    try:
        found = unsupported_ops(model)
    except Exception:  # a model the interpreter cannot even read says nothing more
        return ""
    if not found:
        return ""
    return (f" (onnxfair cannot interpret {', '.join(found)} either; re-export the model without "
            f"{'them' if len(found) > 1 else 'it'})")


def create_session(
    model: onnx.ModelProto,
    device: str = "auto",
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    threads: int = 0,
    dynamic_batch: bool = True,
) -> Session:
    """Session on `device` (auto|cpu|cuda); errors if cuda was asked for and is not what runs."""
    ort = _ort()
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device!r} is not one of auto, cpu, cuda")
    if not model.graph.output:
        raise NoOutputsError()
    first = model.graph.output[0]
    kind = first.type.WhichOneof("value")
    if kind not in (None, "tensor_type"):  # a sequence or map (ZipMap, say) holds no batch of class scores
        raise ModelError(f"the model's first output {first.name!r} is a {kind.removesuffix('_type')}, not a tensor of "
                         "class scores; re-export the model with its class scores as the first output")
    if kind == "tensor_type" and first.type.tensor_type.elem_type == onnx.TensorProto.STRING:
        raise ModelError(f"the model's first output {first.name!r} holds strings (class labels, say), not class scores; "
                         "re-export the model with its class scores (or class indices) as the first output")
    m = fix_input_shapes(model, input_shapes or {})
    candidates = batch_candidates(m)
    exported = fixed_batch(m)
    if dynamic_batch:
        m = make_batch_dynamic(m)
    available = ort.get_available_providers()
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif "CUDAExecutionProvider" in available:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cuda":
        raise RuntimeUnavailableError(
            "--device cuda asked for, but onnxruntime has no CUDAExecutionProvider; on a CUDA machine run "
            "pip uninstall -y onnxruntime, then pip install 'onnxfair[gpu]' (the CPU and GPU wheels cannot share an install)"
        )
    else:
        providers = ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Errors come back as exceptions and are reported in one line; onnxruntime's own log would repeat them.
    opts.log_severity_level = 4
    ort.set_default_logger_severity(3)
    # Spinning worker threads steal the cores from the other sessions timed in the same interleaved loop
    # (seen: 20-40x skew on 2 cores); without spinning the medians of identical models agree.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(m.SerializeToString(), sess_options=opts, providers=providers)
    except Exception as exc:
        message = ort_message(exc)
        newer = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", message)
        fix = (f"; save it with ir_version {newer[2]} or lower (onnx: model.ir_version = {newer[2]}, when its opsets "
               "allow) or upgrade onnxruntime") if newer else ""
        if not fix:
            fix = _interpreter_reason(m)
        raise ModelError(f"onnxruntime cannot load the model: {message}{fix}") from None
    used = sess.get_providers()[0]
    if "CUDAExecutionProvider" in providers and used != "CUDAExecutionProvider":
        if device == "cuda":
            raise RuntimeUnavailableError("--device cuda asked for, but CUDA is not usable here (session fell back to CPU)")
        warn_once("CUDA provider installed but not usable; running on CPU")
    specs = input_specs(m)
    # a batch still fixed here is one make_batch_dynamic leaves alone (or dynamic_batch=False kept)
    fixed = fixed_batch(m)
    return Session(sess, used, threads or (os.cpu_count() or 1), [sp.name for sp in specs], fixed is None, fixed or 1,
                   candidates, exported if fixed is None else None)


def timing_batch(sessions: list[Session], wanted: int) -> int:
    """The batch to time every session at: `wanted` when all take any batch, else the one a graph fixes (said
    on stderr when another batch than the default 1 was asked for)."""
    fixed = [s.declared_batch for s in sessions if not s.batch_dynamic]
    if fixed and wanted not in (1, fixed[0]):
        warn_once(f"--latency-batch {wanted} cannot be honoured: the model runs batches of {fixed[0]} rows only; "
                  f"timing at batch {fixed[0]}")
    return fixed[0] if fixed else wanted


def latency_inputs(inputs: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """A batch of real rows (repeated if the data has fewer) for timing."""
    n = next(iter(inputs.values())).shape[0]
    idx = np.arange(batch_size) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


def measure_latency(
    sessions: list[Session], feed: dict[str, np.ndarray], warmup: int = 5, repeats: int = 30
) -> list[dict]:
    """Median and p90 wall time per session, repetitions interleaved so drift hits every model alike."""
    batch = next(iter(feed.values())).shape[0]
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:
        for _ in range(warmup):
            try:
                s.session.run(None, {k: feed[k] for k in s.input_names})
            except Exception as exc:
                f = {k: feed[k] for k in s.input_names}
                if s.batch_dynamic and s.pin_batch(f):  # a hard-coded batch met before any evaluation
                    return measure_latency(sessions, latency_inputs(feed, s.declared_batch), warmup, repeats)
                raise ModelError(f"onnxruntime failed to time the model at batch {batch}: {ort_message(exc)}; "
                                 f"{RUN_FIX}") from None
    for _ in range(repeats):
        for i, s in enumerate(sessions):
            f = {k: feed[k] for k in s.input_names}
            t0 = time.perf_counter()
            s.session.run(None, f)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [
        {
            "provider": s.provider,
            "threads": s.threads,
            "batch_size": batch,
            "repeats": repeats,
            "median_ms": float(np.median(t)),
            "p90_ms": float(np.percentile(t, 90)),
        }
        for s, t in zip(sessions, times)
    ]
