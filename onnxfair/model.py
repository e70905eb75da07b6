"""Loading, checking and saving ONNX models; the input model is never modified in place."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxfair.errors import ModelError, UsageError

# Float element types, one set so parameter counts, the interpreter's trainable weights and the risk
# report agree on what a float weight is. Sparse storage narrows it (see graph/storage.py).
FLOAT_TYPES: frozenset[int] = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, element dtype and shape (ints, or str for symbolic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]


def load_model(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, with a clear error for every way this fails."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}; pass the path of an .onnx file")
    if p.is_dir():
        raise ModelError(f"{p} is a directory; pass the path of an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"{p} is not an ONNX model ({type(exc).__name__}); export the model to ONNX first") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{p} is not an ONNX model (empty graph); export the model to ONNX first")
    _load_external_data(model, p)
    if check:
        try:
            onnx.checker.check_model(_without_deprecated_ops(model), full_check=False)
        except Exception as exc:
            first = " ".join(str(exc).split())[:300] or type(exc).__name__  # the checker's text spans lines
            raise ModelError(f"{p} is rejected by the ONNX checker: {first}; re-export the model") from None
    return model


def with_ops_as_identity(model: onnx.ModelProto, ops: set[str]) -> onnx.ModelProto:
    """Copy in which the default-domain nodes of `ops` (each keeping its first input's shape and type) are
    Identity nodes: what onnx's checker and shape inference are shown when they cannot read those ops. The
    model itself when it has none."""
    if not any(n.op_type in ops and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    shown = onnx.ModelProto()
    shown.CopyFrom(model)
    for n in shown.graph.node:
        if n.op_type in ops and n.domain in ("", "ai.onnx"):
            n.op_type = "Identity"
            del n.input[1:]
            del n.output[1:]
            del n.attribute[:]
    return shown


def _without_deprecated_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model the checker is shown: GroupNormalization at opsets 18-20 becomes an Identity, since onnx
    marks that version deprecated (its scale is per group) while onnxruntime runs it."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return with_ops_as_identity(model, {"GroupNormalization"}) if 18 <= opset < 21 else model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read weights stored beside the model (onnx's external data), naming the file when it is missing or
    shorter than the model says: otherwise the failure reads as a model that is not ONNX at all."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        data = path.parent / info.location
        fix = "keep the model's external data file beside it, or re-export with the weights embedded"
        if not data.is_file():
            raise ModelError(f"{path} keeps weight {tensor.name!r} in {data}, which is missing; {fix}")
        needed = (info.offset or 0) + (info.length or 0)
        if data.stat().st_size < needed:
            raise ModelError(f"{path} keeps weight {tensor.name!r} in {data}, which has {data.stat().st_size:,} "
                             f"bytes where {needed:,} are needed (truncated?); {fix}")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelError(f"cannot read the external data of {path}: {exc}; re-export with the weights embedded") from None


def _umask_mode() -> int:
    """The mode a plainly created file gets (mkstemp makes 0600 files, which surprises users)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, protect: list[str | os.PathLike] = ()) -> Path:
    """Write to a temporary file in the target folder, then rename: a reader never sees half a model.

    `protect` lists paths that must not be overwritten (the input model).
    """
    target = Path(path)
    for other in protect:
        if Path(other).exists() and target.exists() and os.path.samefile(target, other):
            raise UsageError(f"refusing to overwrite the input model {other}; choose another -o path")
    if target.parent and not target.parent.exists():
        raise UsageError(f"output folder {target.parent} does not exist; create it or choose another -o path")
    with _writable(target) as tmp:
        onnx.save(model, tmp)
    return target


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Atomic text write for reports."""
    target = Path(path)
    with _writable(target) as tmp:
        Path(tmp).write_text(text)
    return target


WRITTEN: list[Path] = []  # files replaced by this process, in order: an interrupted command names them


@contextlib.contextmanager
def _writable(target: Path) -> Iterator[str]:
    """A temporary file beside `target`, renamed onto it when the body succeeds and removed otherwise; a
    failed write (a missing or read-only folder, a full disk) is one line naming the path.

    A symlink is followed, so the file it names is replaced and the link stays. A target that is not a
    regular file (a pipe, /dev/stdout, /dev/null) is written through, never replaced: renaming onto it
    would delete the device or pipe and leave a plain file in its place."""
    if target.exists() and not target.is_file():  # exists() and is_file() follow links
        try:
            yield str(target)
        except OSError as exc:
            raise UsageError(f"cannot write {target}: {exc.strerror or exc}; choose another path") from None
        return
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent or "."))
        os.close(fd)
        yield tmp
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode) if target.is_file() else _umask_mode())
        os.replace(tmp, target)
        WRITTEN.append(target)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}; choose another path") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {init.name for init in model.graph.initializer}


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph's real inputs (initializers listed as inputs are skipped, as in IR < 4 files)."""
    inits = initializer_names(model)
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or f"{vi.name}_dim{i}")
        specs.append(InputSpec(vi.name, np.dtype(dtype), tuple(dims)))
    return specs


BATCH_FIRST_FIX = ("re-export the model with the batch first (batch_first=True for recurrent layers, or a Transpose "
                   "inside the model)")


def batch_axis_error(model: onnx.ModelProto) -> str | None:
    """The refusal for a model that takes its batch on an axis other than 0 (a time-major recurrent layer,
    say): the first output's dim 0 is a symbolic dim that an input holds on a later axis only. Fed rows along
    axis 0, such a model mixes them silently; None when the declared shapes show no such input."""
    outputs = model.graph.output
    dims = outputs[0].type.tensor_type.shape.dim if outputs else []
    batch = dims[0].dim_param if dims and dims[0].HasField("dim_param") else ""
    if not batch:
        return None
    specs = [sp for sp in input_specs(model) if sp.shape]
    for sp in specs:
        if sp.shape[0] != batch and batch in sp.shape[1:]:
            return (f"model input {sp.name!r} has shape {list(sp.shape)}: its batch ({batch}, the first output's dim 0) "
                    f"is on axis {list(sp.shape).index(batch)}, and onnxfair reads rows along axis 0; {BATCH_FIRST_FIX}")
    # every axis 0 fixed (above 1: a batch of 1 pinned in the input alone is common) and an axis 1 that is not:
    # the output's rows come from that axis, as [T, N] token ids with T fixed
    if specs and all(isinstance(sp.shape[0], int) for sp in specs):
        sp = next((sp for sp in specs if sp.shape[0] > 1 and len(sp.shape) > 1 and isinstance(sp.shape[1], str)), None)
        if sp is not None:
            return (f"model input {sp.name!r} has shape {list(sp.shape)}: axis 0 is fixed while the first output's "
                    f"rows ({batch}) are not, so the batch is likely on axis 1, and onnxfair reads rows along axis 0; "
                    f"{BATCH_FIRST_FIX}")
    return None


def batch_axis_hint(shapes: dict[str, tuple[int, ...]], out_rows: int) -> str:
    """When a model returns `out_rows` rows for inputs of these shapes and an input has that size on a later
    axis only, the likely cause (a batch on that axis, as in a time-major recurrent model), else ''."""
    for name, shape in shapes.items():
        if len(shape) > 1 and shape[0] != out_rows and out_rows in shape[1:]:
            return (f" (as many as input {name!r} has on axis {list(shape).index(out_rows, 1)}: if the batch is on that "
                    f"axis, as in a time-major recurrent model, {BATCH_FIRST_FIX})")
    return ""


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """Dim 0 the inputs fix; None when it is symbolic."""
    return next((sp.shape[0] for sp in input_specs(model) if sp.shape and isinstance(sp.shape[0], int)
                 and sp.shape[0] > 0), None)


def declared_batch(model: onnx.ModelProto) -> int:
    """Dim 0 the inputs fix (1 when symbolic): the batch a graph that hard-codes its batch is first tried at."""
    return fixed_batch(model) or 1


def batch_candidates(model: onnx.ModelProto) -> tuple[int, ...]:
    """Batches a graph may hard-code, most likely first: the declared one, then the leading entry of each
    constant Reshape shape (a symbolic input followed by Reshape [4, -1] only ever runs 4 rows)."""
    consts = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    found = [declared_batch(model)]
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in consts:
            shape = numpy_helper.to_array(consts[node.input[1]]).reshape(-1)
            if shape.size and shape[0] > 0:
                found.append(int(shape[0]))
    return tuple(dict.fromkeys(found))


def classes_of(shape) -> int | None:
    """Classes an output of this shape scores, read as the losses read logits: the product of the dims after
    the batch (one column, or a rank-1 output, is a binary logit: 2); None when one of them is unknown."""
    tail = list(shape)[1:]
    if any(not isinstance(d, int) or d <= 0 for d in tail):
        return None
    n = int(np.prod(tail)) if tail else 1
    return 2 if n == 1 else n


def _argmax_classes(model: onnx.ModelProto) -> int | None:
    """The classes an ArgMax head picks among (the size of its input's axis), when the first output is that
    ArgMax's indices, directly or through shape-only ops and a Cast; None when the graph does not say."""
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(model.graph.output[0].name)
    while node is not None and node.op_type in ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"):
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("ArgMax", "ArgMin"):
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph onnx cannot infer: the labels are checked against the predictions' range only
        return None
    infos = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    info = infos.get(node.input[0])
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    dims = info.type.tensor_type.shape.dim
    if not -len(dims) <= axis < len(dims) or not dims[axis].HasField("dim_value"):
        return None
    return int(dims[axis].dim_value)


def class_count(model: onnx.ModelProto) -> int | None:
    """Classes the first graph output scores (see `classes_of`), or an ArgMax head picks among; None when its
    shape is not known or the graph does not say (an integer label output of another kind, say)."""
    t = model.graph.output[0].type.tensor_type if model.graph.output else None
    if t is not None and t.elem_type not in FLOAT_TYPES:
        return _argmax_classes(model)
    if t is None or not t.HasField("shape"):  # not class scores: cannot tell
        return None
    dims = t.shape.dim
    if not dims:
        return None
    return classes_of([d.dim_value if d.HasField("dim_value") else None for d in dims])


def parse_input_shapes(values: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """`NAME=d0,d1,...` options into a dict; a clear error otherwise."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in values or ():
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.split(","))
            if any(not 0 < d < 2**63 for d in shape):  # an ONNX dim is an int64
                raise ValueError
        except ValueError:
            raise UsageError(f"bad --input-shape {item!r}; write NAME=d0,d1,... with positive integers") from None
        if name in shapes:
            raise UsageError(f"--input-shape names {name!r} twice ({name}={','.join(map(str, shapes[name]))} and "
                             f"{item}); give each input one shape")
        shapes[name] = shape
    return shapes


def make_batch_dynamic(model: onnx.ModelProto, batch_name: str = "batch") -> onnx.ModelProto:
    """Copy of the model whose inputs/outputs have a symbolic leading dim.

    Torch exports default to a static batch of 1; evaluating a dataset one row at a time would be slow.
    Internal value_info shapes are dropped because they would pin the batch again; onnxruntime
    re-infers them. Reshape constants that hard-code the batch (rare: exporters write 0 or -1) are left
    alone, and if the model then fails on a larger batch, the runtime falls back to batch 1.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = initializer_names(m)
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) > 0 and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = batch_name
    del m.graph.value_info[:]
    return m


def input_dims(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None, batch: int | None = None,
               require_static: bool = False) -> dict[str, tuple[int | None, ...]]:
    """Dims of every real input once `shapes` (--input-shape values) and `batch` apply; None is symbolic.

    The one check of --input-shape values, so every command rejects the same mistakes with the same
    words: an unknown input, a wrong number of dims, a value that contradicts a dim the model fixes and,
    with require_static, a symbolic non-batch dim left without a size. Dim 0 is the batch: a fixed one
    is kept, a symbolic one becomes `batch`. A given dim-0 value is neither applied nor checked here,
    because callers treat the batch differently (sessions take it, cost and analysis set their own). The
    exception is an input whose symbolic dim 0 is named apart from the first input's (a matrix fed beside
    the batch, [k, 3] next to [batch, k]): that dim is no batch, so a given value applies. A later dim
    takes the size given for a dim of the same name on another input (input_ids' and attention_mask's seq).
    """
    inits = initializer_names(model)
    real = [vi for vi in model.graph.input if vi.name not in inits]
    shapes = shapes or {}
    names = [vi.name for vi in real]
    for name in shapes:
        if name not in names:
            raise UsageError(f"--input-shape names {name!r}, which is not a model input; inputs: {', '.join(names)}")
    named: dict[str, int] = {}  # a dim an --input-shape sizes sizes every other input's dim of that name
    for vi in real:
        given = shapes.get(vi.name)
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if given is None or i == 0 or i >= len(given) or d.HasField("dim_value") or not d.dim_param:
                continue
            if named.get(d.dim_param, given[i]) != given[i]:
                raise UsageError(f"--input-shape gives dim {d.dim_param!r} two sizes ({named[d.dim_param]} and "
                                 f"{given[i]}), and the model names them as one; give it one size")
            named[d.dim_param] = int(given[i])
    out: dict[str, tuple[int | None, ...]] = {}
    first = real[0].type.tensor_type.shape.dim if real else []
    batch_name = first[0].dim_param if len(first) and not first[0].HasField("dim_value") else None
    for vi in real:
        model_dims = vi.type.tensor_type.shape.dim
        given = shapes.get(vi.name)
        if given is not None and len(given) != len(model_dims):
            raise UsageError(f"--input-shape {vi.name} has {len(given)} dims, the model input has {len(model_dims)}")
        dims: list[int | None] = []
        for i, d in enumerate(model_dims):
            fixed = int(d.dim_value) if d.HasField("dim_value") else None
            if i == 0:
                apart = given is not None and fixed is None and batch_name is not None and d.dim_param != batch_name
                dims.append(int(given[0]) if apart else batch if fixed is None else fixed)
            elif given is not None:
                if fixed is not None and fixed != given[i]:
                    raise UsageError(f"--input-shape {vi.name}: dim {i} is fixed to {fixed} in the model, not {given[i]}")
                dims.append(int(given[i]))
            elif fixed is None and d.dim_param in named:
                dims.append(named[d.dim_param])
            elif fixed is None and require_static:
                raise UsageError(
                    f"input {vi.name!r} has a symbolic dimension {d.dim_param or '?'} at axis {i}; "
                    f"pass --input-shape {vi.name}=d0,d1,... with its size")
            else:
                dims.append(fixed)
        out[vi.name] = tuple(dims)
    return out


def with_input_dims(model: onnx.ModelProto, dims: dict[str, tuple[int | None, ...]]) -> onnx.ModelProto:
    """Copy with the named inputs' dims set (None leaves a dim as it is); dims already equal are untouched."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        for d, v in zip(vi.type.tensor_type.shape.dim, dims.get(vi.name, ())):
            if v is not None and not (d.HasField("dim_value") and d.dim_value == v):
                d.Clear()
                d.dim_value = int(v)
    return m


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Copy of the model with the named inputs' dims set to the given values, the batch dim included."""
    if not shapes:
        return model
    input_dims(model, shapes)  # raises on unknown names, wrong ranks and contradicted non-batch dims
    return with_input_dims(model, shapes)


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
