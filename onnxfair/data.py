"""Grouped datasets: model inputs, labels and demographic group ids from npz, csv/parquet or an image manifest."""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from onnxfair.errors import DataError, UsageError
from onnxfair.model import InputSpec, batch_axis_error, class_count, input_dims, input_specs, with_input_dims
from onnxfair.runtime import warn_once


@dataclass
class ImageOptions:
    """How manifest images become a tensor: resize, scale to [0,1], normalise per channel, layout."""

    size: tuple[int, int] | None = None  # (height, width); default: the model's static H, W
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    path_column: str = "path"


@dataclass
class GroupedDataset:
    """Inputs keyed by model input name, int64 labels, and one group id per row."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray
    group_ids: np.ndarray
    group_labels: list[str]
    attributes: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> "GroupedDataset":
        idx = np.asarray(idx)
        return GroupedDataset(
            {k: v[idx] for k, v in self.inputs.items()},
            self.y[idx],
            self.group_ids[idx],
            list(self.group_labels),
            list(self.attributes),
            self.source,
        )

    def split(self, frac: float, seed: int = 0) -> tuple["GroupedDataset", "GroupedDataset"]:
        """Seeded split stratified by group: `frac` of each group's rows go to the second part."""
        rng = np.random.default_rng(seed)
        first, second = [], []
        for g in range(len(self.group_labels)):
            rows = np.flatnonzero(self.group_ids == g)
            rows = rows[rng.permutation(len(rows))]
            n_second = int(round(frac * len(rows)))
            if len(rows) >= 2:
                n_second = min(max(n_second, 1), len(rows) - 1)
            second.append(rows[:n_second])
            first.append(rows[n_second:])
        a = np.sort(np.concatenate(first)) if first else np.array([], dtype=np.int64)
        b = np.sort(np.concatenate(second)) if second else np.array([], dtype=np.int64)
        return self.subset(a), self.subset(b)

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            yield {k: v[sl] for k, v in self.inputs.items()}, self.y[sl], self.group_ids[sl]

    def group_counts(self) -> dict[str, int]:
        counts = np.bincount(self.group_ids, minlength=len(self.group_labels))
        return {label: int(c) for label, c in zip(self.group_labels, counts)}


def _encode_groups(columns: dict[str, np.ndarray], attributes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Intersectional group labels `a=v1,b=v2`, sorted so ids are stable across runs."""
    n = len(next(iter(columns.values())))
    values = [tuple(_value_text(columns[a][i]) for a in attributes) for i in range(n)]
    labels = np.array([",".join(f"{a}={v}" for a, v in zip(attributes, row)) for row in values], dtype=object)
    uniq = sorted(set(labels.tolist()))
    if len(uniq) != len(set(values)):  # values holding "," or "=" can make two intersections read the same
        seen: dict[str, tuple] = {}
        for row, label in zip(values, labels):
            if seen.setdefault(label, row) != row:
                raise DataError(f"the group values {seen[label]} and {row} of {', '.join(attributes)} both read as "
                                f"{label!r}; remove ',' and '=' from the group values")
    index = {label: i for i, label in enumerate(uniq)}
    ids = np.fromiter((index[label] for label in labels), dtype=np.int64, count=n)
    return ids, uniq


def _value_text(v: object) -> str:
    if isinstance(v, bytes):  # not UTF-8: its bytes stay distinct, as \x.. escapes
        v = v.decode("utf-8", errors="backslashreplace")
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _missing(values: np.ndarray) -> np.ndarray:
    """Rows whose group value is absent (NaN, None, empty or blank text), which would otherwise form a group."""
    if values.dtype.kind in "fc":
        return np.isnan(values)
    if values.dtype.kind in "Mm":  # datetimes and durations: NaT
        return np.isnat(values)
    if values.dtype.kind in "US":
        return np.char.strip(values) == ("" if values.dtype.kind == "U" else b"")
    if values.dtype.kind == "O":  # only tables give object arrays, so pandas is there
        import pandas as pd

        blank = np.fromiter((isinstance(v, (str, bytes)) and not v.strip() for v in values), dtype=bool, count=len(values))
        return np.asarray(pd.isna(values), dtype=bool) | blank
    return np.zeros(len(values), dtype=bool)


def _group_column(values: np.ndarray, name: str, source: str) -> np.ndarray:
    """One value per row: a [N, 1] column is squeezed; other shapes and missing values are refused."""
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise DataError(f"group attribute {name!r} has shape {list(values.shape)}; expected one value per row "
                        "(a 1-D array): pick the right --groups or save the attribute as a 1-D array")
    missing = _missing(values)
    if missing.any():
        raise DataError(f"group attribute {name!r} is missing in {int(missing.sum())} of {len(values)} rows of {source}; "
                        "fill them with an explicit value such as 'unknown', or drop those rows")
    return values


def parse_groups(groups: str | Sequence[str]) -> list[str]:
    names = [g.strip() for g in (groups.split(",") if isinstance(groups, str) else groups) if g.strip()]
    if not names:
        raise UsageError("--groups is empty; name at least one group attribute, e.g. --groups race or race,sex")
    twice = sorted({g for g in names if names.count(g) > 1})
    if twice:
        raise UsageError(f"--groups names {', '.join(twice)} more than once; name each attribute once, e.g. --groups race,sex")
    return names


def _labels(raw: np.ndarray, name: str) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim == 2 and raw.shape[1] == 1:  # a column vector, as group arrays are taken
        raw = raw[:, 0]
    if raw.ndim == 2 and raw.shape[0] == 1:
        raise DataError(f"label {name!r} has shape {raw.shape}, one row holding every sample's label; give one class "
                        f"index per row: save {name}.ravel()")
    if raw.ndim == 2 and raw.shape[1] > 1:
        raise DataError(f"label {name!r} has shape {raw.shape}, one row of {raw.shape[1]} values per sample; give one "
                        f"class index per row (for one-hot or probability rows, save {name}.argmax(1))")
    if raw.ndim != 1:
        raise DataError(f"label {name!r} has shape {raw.shape}; expected one class index per row")
    if raw.dtype.kind not in "iubf":
        raise DataError(f"label {name!r} has dtype {raw.dtype}; give integer class indices (encode strings first)")
    if raw.dtype.kind == "f":
        bad = ~np.isfinite(raw)
        if bad.any():
            raise DataError(f"label {name!r} has NaN or infinite values in {int(bad.sum())} rows; drop or fill those rows")
        if not np.all(raw == np.round(raw)):
            raise DataError(f"label {name!r} is not integral; onnxfair evaluates classifiers: give class indices")
    # checked before the int64 cast, which would wrap huge values into misleading ones
    huge = (raw > 2**62) | (raw < -(2**62)) if raw.dtype.kind in "fiu" else np.zeros(raw.shape, dtype=bool)
    if huge.any():
        raise DataError(f"label {name!r} has values such as {raw[huge][0]:.6g} in {int(huge.sum())} rows, far outside "
                        "any class index; fix the labels or pick the right column with --label")
    return raw.astype(np.int64)


def check_labels(y: np.ndarray, n_classes: int | None, name: str = "y") -> None:
    """Labels must be class indices the model scores: 0 .. n_classes - 1 (only >= 0 when that is unknown)."""
    bad = (y < 0) if n_classes is None else (y < 0) | (y >= n_classes)
    if bad.any():
        values = ", ".join(str(v) for v in np.unique(y[bad])[:5])
        span = "must be >= 0" if n_classes is None else f"must be in 0..{n_classes - 1} for a {n_classes}-class model output"
        raise DataError(f"label {name!r} has values {values} in {int(bad.sum())} rows; class indices {span}: "
                        "fix the labels or pick the right column with --label")


def _conform(name: str, arr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Check shape and dtype against the model input; cast only lossless-safe numeric kinds."""
    want = "[" + ", ".join(str(d) if isinstance(d, int) else "N" if i == 0 else str(d) for i, d in enumerate(spec.shape)) + "]"
    if arr.ndim == len(spec.shape) + 1 and tuple(arr.shape[1:]) == tuple(spec.shape):
        raise DataError(  # no reshape of the data can help: the graph takes one sample
            f"model input {name!r} takes one sample of shape {list(spec.shape)} with no batch axis, and onnxfair feeds "
            "rows along dim 0; re-export the model with a leading (dynamic) batch dimension")
    if arr.ndim != len(spec.shape):
        raise DataError(
            f"input {name!r} has shape {list(arr.shape)}, the model expects {want} of {spec.dtype}; reshape the data"
        )
    for i, (have, d) in enumerate(zip(arr.shape, spec.shape)):
        if i > 0 and isinstance(d, int) and have != d:
            raise DataError(
                f"input {name!r} has shape {list(arr.shape)}, the model expects {want} of {spec.dtype}; reshape the data"
            )
    if arr.dtype != spec.dtype:
        if spec.dtype.kind == "O":  # an ONNX string tensor: an npz holds strings only as fixed-width unicode
            raise DataError(f"model input {name!r} takes strings, which onnxfair does not feed; export the model with "
                            "numeric inputs (token ids or encoded features, say)")
        if spec.dtype.kind == "V":  # bfloat16 and the float8 types live in ml_dtypes, not in numpy's formats
            raise DataError(f"model input {name!r} takes {spec.dtype}, which data files cannot hold and onnxruntime's "
                            "CPU provider runs few ops in; export the model with float32 (or float16) inputs")
        if arr.dtype.kind in "fiub" and spec.dtype.kind in "f":
            with np.errstate(over="ignore"):  # a value beyond the model's float type is reported below, by name
                cast = arr.astype(spec.dtype)
            beyond = np.isinf(cast) & np.isfinite(arr)
            if beyond.any():
                rows = int(beyond.reshape(arr.shape[0], -1).any(axis=1).sum())
                raise DataError(f"input {name!r} holds values beyond {spec.dtype}'s range (largest "
                                f"{float(np.finfo(spec.dtype).max):.4g}) in {rows} rows, which the model input cannot "
                                "take; rescale the data or export the model with wider float inputs")
            arr = cast
        elif arr.dtype.kind in "iub" and spec.dtype.kind in "iu":
            rows = 0 if np.can_cast(arr.dtype, spec.dtype) else _rows_outside(arr, spec.dtype)
            if rows:
                info = np.iinfo(spec.dtype)
                raise DataError(f"input {name!r} holds values outside {spec.dtype} ({info.min}..{info.max}) in {rows} "
                                f"rows, which the model input cannot take (a cast would wrap them); fix those values")
            arr = arr.astype(spec.dtype)
        else:
            raise DataError(f"input {name!r} has dtype {arr.dtype}, the model expects {spec.dtype}; convert the data")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(arr.shape[0], -1).any(axis=1).sum())
        raise DataError(f"input {name!r} has NaN or infinite values in {bad} rows; clean or drop those rows")
    return np.ascontiguousarray(arr)


def _check_shared_dims(specs: list[InputSpec], inputs: dict[str, np.ndarray]) -> None:
    """Inputs whose shapes name one symbolic dim (token ids and their attention mask share `seq`) must give
    it one size: otherwise the model fails deep inside, on a broadcast that names neither array."""
    seen: dict[str, tuple[str, int]] = {}
    for sp in specs:
        arr = inputs.get(sp.name)
        if arr is None:
            continue
        for axis, d in enumerate(sp.shape[1:], start=1):
            if not isinstance(d, str) or axis >= arr.ndim or d.startswith(f"{sp.name}_dim"):
                continue  # fixed, or unnamed (input_specs names those after their input alone)
            other = seen.setdefault(d, (sp.name, arr.shape[axis]))
            if other[1] != arr.shape[axis]:
                raise DataError(f"inputs {other[0]!r} and {sp.name!r} share the model's dim {d!r}, and the data gives it "
                                f"{other[1]} and {arr.shape[axis]}; give both arrays one size there")


def _rows_outside(x: np.ndarray, dtype: np.dtype) -> int:
    """Rows of `x` holding a value the integer `dtype` cannot represent."""
    info = np.iinfo(dtype)
    return int(((x < info.min) | (x > info.max)).reshape(x.shape[0], -1).any(axis=1).sum())


def _check_columns(available: Sequence[str], wanted: Sequence[str], what: str, path: Path) -> None:
    for w in wanted:
        if w not in available:
            raise DataError(f"{what} {w!r} not found in {path.name}; available: {', '.join(map(str, available))}")


def load_dataset(
    path: str | Path,
    model: onnx.ModelProto,
    groups: str | Sequence[str],
    label: str | None = None,
    features: Sequence[str] | None = None,
    image: ImageOptions | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> GroupedDataset:
    """Load `--data` in the format its suffix names, shaped and typed for `model` once `input_shapes`
    (--input-shape) fix its symbolic dims: an image manifest then takes its size from them."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}; pass an .npz, .csv, .parquet or image manifest .csv")
    attributes = parse_groups(groups)
    misplaced = batch_axis_error(model)
    if misplaced:
        raise UsageError(misplaced)
    specs = input_specs(with_input_dims(model, input_dims(model, input_shapes)) if input_shapes else model)
    suffix = p.suffix.lower()
    image_given = image is not None and image != ImageOptions()
    if suffix == ".npz" and features:
        raise UsageError(f"--features names table columns, and {p.name} is an npz, whose arrays are named by model input; "
                         "drop --features")
    if suffix == ".npz" and image_given:
        raise UsageError(f"--image-size, --mean, --std and --layout apply to image manifests, and {p.name} is an npz of "
                         "ready tensors; drop them")
    if suffix == ".npz":
        inputs, y, cols = _load_npz(p, specs, attributes, label or "y")
    elif suffix in TABLE_SUFFIXES:
        table, group_text = _read_table(p, attributes)
        if len(table) == 0:
            raise DataError(f"{p.name} has a header but no rows; give a file with at least one labelled row")
        path_col = (image or ImageOptions()).path_column
        if path_col in table and features is None:  # --features names a plain table, whatever its columns
            inputs, y = _load_manifest(p, table, specs, attributes, label or "label", image or ImageOptions())
        elif image_given:
            why = "--features makes it a table" if path_col in table else f"it has no {path_col!r} column"
            raise UsageError(f"--image-size, --mean, --std and --layout apply to image manifests, and {p.name} is read as a "
                             f"table ({why}); drop them")
        else:
            inputs, y = _load_table(p, table, specs, attributes, label or "label", features)
        cols = {a: group_text[a] if a in group_text else table[a].to_numpy() for a in attributes}
    else:
        raise DataError(f"unsupported data format {suffix or '(no suffix)'}; use .npz, .csv, .parquet or an image manifest .csv")
    n = len(y)
    cols = {a: _group_column(col, a, p.name) for a, col in cols.items()}
    for name, arr in inputs.items():
        if arr.shape[0] != n:
            raise DataError(f"input {name!r} has {arr.shape[0]} rows but the label has {n}; the arrays must align")
    _check_shared_dims(specs, inputs)
    for a, col in cols.items():
        if len(col) != n:
            raise DataError(f"group attribute {a!r} has {len(col)} rows but the label has {n}; the arrays must align")
    if n == 0:
        raise DataError(f"{p.name} has no rows; give a file with at least one labelled row")
    check_labels(y, class_count(model), label or ("y" if suffix == ".npz" else "label"))
    ids, labels = _encode_groups(cols, attributes)
    return GroupedDataset(inputs, y, ids, labels, list(attributes), str(p))


TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def data_format(path: str | Path, features: Sequence[str] | None = None, path_column: str = "path") -> str:
    """How load_dataset reads `path`: "npz", "table" or "manifest" (a table with a path column and no
    --features); "other" for a suffix it refuses or a header it cannot read, which load_dataset reports."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix not in TABLE_SUFFIXES:
        return "other"
    try:
        if suffix == ".csv":
            import pandas as pd

            columns = pd.read_csv(p, nrows=0).columns
        else:
            import pyarrow.parquet as pq

            columns = pq.read_schema(p).names
    except Exception:
        return "other"
    return "manifest" if path_column in columns and features is None else "table"


def manifest_images(path: str | Path, path_column: str = "path") -> list[Path]:
    """The image files an image manifest lists (as load_dataset resolves them); [] for anything else, or a
    file it cannot read (load_dataset reports that)."""
    p = Path(path)
    if data_format(p, None, path_column) != "manifest":
        return []
    try:
        table, _ = _read_table(p)
        rels = [str(r) for r in table[path_column].dropna()]
    except (DataError, KeyError):
        return []
    return [(p.parent / r) if not Path(r).is_absolute() else Path(r) for r in rels]


def load_datasets(
    paths: Sequence[str | Path | None],
    model: onnx.ModelProto,
    groups: str | Sequence[str],
    label: str | None = None,
    features: Sequence[str] | None = None,
    image: ImageOptions | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[GroupedDataset | None]:
    """--data and --eval-data read with one set of data options: --features goes to the tables and the image
    options to the manifests, so a csv and an npz can be paired; an option that no file reads goes to every
    file, whose refusal names it. A None path gives None."""
    formats = [data_format(p, features, (image or ImageOptions()).path_column) if p else None for p in paths]
    tables, manifests = "table" in formats, "manifest" in formats
    out: list[GroupedDataset | None] = []
    for p, fmt in zip(paths, formats):
        if p is None:
            out.append(None)
            continue
        own_features = features if fmt in ("table", "other") or not tables else None
        own_image = image if fmt in ("manifest", "other") or not manifests else None
        out.append(load_dataset(p, model, groups, label, own_features, own_image, input_shapes))
    return out


def shapes_from_rows(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None,
                     datasets: Sequence[GroupedDataset | None], say: Callable[[str], None] = lambda _m: None
                     ) -> dict[str, tuple[int, ...]]:
    """--input-shape values, completed for each input whose non-batch dims the model leaves symbolic: they
    take the size of the data's rows, the size it is scored and judged at, so that channel analysis and MAC
    counts need no --input-shape there. Rows of two sizes (--data and --eval-data) are refused: one analysed
    size could not describe both."""
    shapes = dict(shapes or {})
    for name, d in input_dims(model, shapes).items():
        rows = {tuple(ds.inputs[name].shape[1:]) for ds in datasets if ds is not None and name in ds.inputs}
        if name in shapes or None not in d[1:] or not rows:
            continue
        if len(rows) > 1:
            sizes = " and ".join("x".join(map(str, r)) for r in sorted(rows))
            raise UsageError(f"input {name!r} leaves dims symbolic and the data's rows come in two sizes ({sizes}); "
                             "give --data and --eval-data at one size")
        shapes[name] = (d[0] or 1, *rows.pop())
        say(f"input {name!r}: symbolic dims set from the data's rows: {','.join(map(str, shapes[name]))} "
            "(--input-shape sets them)")
    return shapes


def _load_npz(p: Path, specs: list[InputSpec], attributes: Sequence[str], label: str):
    try:
        z = np.load(p, allow_pickle=False)
        keys = list(z.files)
    except Exception as exc:
        raise DataError(f"cannot read {p.name} as npz ({type(exc).__name__}); save it with numpy.savez") from None
    arrays = {}
    for k in keys:
        try:
            arrays[k] = z[k]
        except Exception as exc:
            if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
                raise DataError(f"array {k!r} in {p.name} holds Python objects, which onnxfair refuses to unpickle for "
                                f"safety; fill in missing values, then save strings with a fixed-width dtype, e.g. "
                                f"numpy.savez(..., {k}=arr.astype(str))") from None
            raise DataError(f"cannot read array {k!r} of {p.name} ({type(exc).__name__}); save it with numpy.savez") from None
    if label not in keys:
        shared = " (--label names the label in every data file given)" if label != "y" else ""
        raise DataError(f"label array {label!r} not found in {p.name}; available: {', '.join(keys)}{shared}")
    _check_columns(keys, attributes, "group array", p)
    inputs = {}
    for spec in specs:
        if spec.name == label:  # one array cannot be both: it would be fed as the input and read as the labels
            raise DataError(f"the model input {spec.name!r} has the label array's name in {p.name}; save the labels "
                            f"under another name and pass it with --label")
        if spec.name in arrays:
            arr = arrays[spec.name]
        elif len(specs) == 1 and "x" in arrays:
            arr = arrays["x"]
        else:
            want = "x" if len(specs) == 1 else spec.name
            raise DataError(f"no array for model input {spec.name!r} in {p.name} (name it {want!r}); arrays: {', '.join(keys)}")
        inputs[spec.name] = _conform(spec.name, arr, spec)
    return inputs, _labels(arrays[label], label), {a: arrays[a] for a in attributes}


class _DuplicateColumns(Exception):
    pass


def _read_table(p: Path, group_columns: Sequence[str] = ()) -> tuple:
    """The table, and a csv's group columns read again as text: `01` and `1`, or `1.0` and `1`, are different
    groups (codes), never merged by parsing them as numbers, while the same column named as the label or a
    feature keeps its parsed numbers."""
    try:
        import pandas as pd
    except ImportError:
        raise DataError("reading csv/parquet needs pandas; pip install pandas (and pyarrow for parquet)") from None
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p), {}
        # only an empty cell is missing: "NA" or "None" can be real group values (pandas' default reads them as NaN)
        table = pd.read_csv(p, keep_default_na=False, na_values=[""])
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            raw = next(csv.reader(f), [])
        twice = sorted({c for c in raw if raw.count(c) > 1})
        if twice:  # pandas renames the second `label` to `label.1`, which would then be read as a feature
            raise _DuplicateColumns(f"{p.name} names the column {twice[0]!r} twice in its header; rename or drop one "
                                    "of them")
        present = [a for a in group_columns if a in table.columns]
        if not present:
            return table, {}
        text = pd.read_csv(p, keep_default_na=False, na_values=[""], dtype=str, usecols=present)
        return table, {a: text[a].to_numpy() for a in present}
    except ImportError:
        raise DataError("reading parquet needs pyarrow; pip install 'onnxfair[parquet]'") from None
    except _DuplicateColumns as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:
        kind = "a parquet file" if p.suffix.lower() in (".parquet", ".pq") else "a CSV with a header row and one row per sample"
        raise DataError(f"cannot read {p.name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        f"give {kind}") from None


def _single_spec(specs: list[InputSpec], what: str) -> InputSpec:
    if len(specs) != 1:
        raise DataError(f"{what} feeds one model input but the model has {len(specs)}; use an .npz with one array per input")
    return specs[0]


def _load_table(p: Path, table, specs, attributes, label, features):
    columns = [str(c) for c in table.columns]
    _check_columns(columns, [label], "label column", p)
    _check_columns(columns, attributes, "group column", p)
    if features is None:
        features = [c for c in columns if c != label and c not in attributes]
    else:
        _check_columns(columns, features, "feature column", p)
        twice = sorted({c for c in features if list(features).count(c) > 1})
        if twice:
            raise DataError(f"--features names {', '.join(twice)} more than once; name each feature column once, in order")
        if label in features:  # a group column may be a feature (deployed models often read it); the label may not
            raise DataError(f"--features includes the label column {label!r}, so the model would be handed the answer; "
                            "leave it out of --features (or name the real label with --label)")
    spec = _single_spec(specs, "a table")
    try:
        x = table[list(features)].to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        bad = [c for c in features if table[c].dtype.kind not in "fiub"]
        raise DataError(f"feature columns {', '.join(bad)} are not numeric; encode them or leave them out with --features") from None
    if np.isnan(x).any():
        bad_rows = int(np.isnan(x).any(axis=1).sum())
        raise DataError(f"feature columns have NaN in {bad_rows} rows of {p.name}; clean or drop those rows")
    tail = spec.shape[1:]
    if all(isinstance(d, int) for d in tail) and int(np.prod(tail)) == x.shape[1] and len(tail) != 1:
        x = x.reshape((x.shape[0],) + tuple(tail))
    elif all(isinstance(d, int) for d in tail) and int(np.prod(tail)) != x.shape[1]:
        raise DataError(
            f"{p.name} gives {x.shape[1]} feature columns ({', '.join(list(features)[:8])}"
            f"{', ...' if len(features) > 8 else ''}), the model input {spec.name!r} takes "
            f"{int(np.prod(tail))}; name the feature columns in order with --features (a group or label column "
            "left out of --groups counts as a feature)")
    if spec.dtype.kind in "iu":
        x = _as_integers(table, list(features), x, spec, p)
    elif spec.dtype.kind == "b":  # a table holds flags as 0/1 (or true/false, read as 1.0/0.0)
        if not np.isin(x, (0.0, 1.0)).all():
            rows = int((~np.isin(x, (0.0, 1.0))).reshape(x.shape[0], -1).any(axis=1).sum())
            raise DataError(f"the model input {spec.name!r} is bool but the feature columns of {p.name} hold values "
                            f"other than 0 and 1 in {rows} rows; give 0/1 (or true/false) flags")
        x = x.astype(bool)
    x = _conform(spec.name, x, spec)
    return {spec.name: x}, _labels(table[label].to_numpy(), label)


def _as_integers(table, features: list[str], x: np.ndarray, spec: InputSpec, p: Path) -> np.ndarray:
    """Integer model inputs (token ids) take whole-number features; anything else would be silently rounded.
    Integer columns are taken exactly, each on its own (a float64 round trip loses ids above 2**53, and a
    table mixing integer and float columns is read as float64 as a whole)."""
    flat = x.reshape(x.shape[0], -1)
    exact = [table[c].dtype.kind in "iub" for c in features]
    inexact = flat[:, [i for i, e in enumerate(exact) if not e]]
    if not np.all(inexact == np.round(inexact)):
        rows = int((inexact != np.round(inexact)).any(axis=1).sum())
        raise DataError(f"the model input {spec.name!r} is {spec.dtype} but the feature columns of {p.name} hold "
                        f"non-integral values in {rows} rows; give whole numbers (e.g. token ids)")
    rows = _rows_outside(x, spec.dtype)
    if rows:
        info = np.iinfo(spec.dtype)
        raise DataError(f"the feature columns of {p.name} hold values outside {spec.dtype} ({info.min}..{info.max}) "
                        f"in {rows} rows, which the model input {spec.name!r} cannot take; fix those values")
    ints = np.empty(flat.shape, np.int64)
    for i, (c, e) in enumerate(zip(features, exact)):
        ints[:, i] = table[c].to_numpy().astype(np.int64) if e else flat[:, i].astype(np.int64)
    return ints.reshape(x.shape).astype(spec.dtype)


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pixels(im, mode: str, size: tuple[int, int], rel: str) -> np.ndarray:
    """The image as float32 in [0, 1], `mode`'s channels, resized to (H, W). A 16-bit grey image is scaled by
    its own depth (Pillow's convert would clip it at 255: an all-white image); 32-bit integer and float pixels
    have no known range and are refused."""
    from PIL import Image

    if im.mode in ("I", "F"):
        raise DataError(f"image {rel} has {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels, whose "
                        "range onnxfair cannot tell; save it as an 8- or 16-bit PNG")
    if im.mode in SIXTEEN_BIT:
        if mode == "RGBA":
            raise DataError(f"image {rel} is 16-bit grey and the model takes RGBA; save it as an 8-bit RGBA PNG")
        grey = np.asarray(im, dtype=np.float32) / 65535.0
        if im.size != (size[1], size[0]):
            grey = np.asarray(Image.fromarray(grey).resize((size[1], size[0]), Image.BILINEAR))
        return np.repeat(grey[..., None], len(mode), axis=2)
    im = im.convert(mode).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def _load_manifest(p: Path, table, specs, attributes, label, opts: ImageOptions):
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image manifests need Pillow; pip install 'onnxfair[images]'") from None
    columns = [str(c) for c in table.columns]
    _check_columns(columns, [label], "label column", p)
    _check_columns(columns, attributes, "group column", p)
    spec = _single_spec(specs, "an image manifest")
    if opts.layout not in ("NCHW", "NHWC"):
        raise UsageError(f"--layout {opts.layout!r} is not supported; use NCHW or NHWC")
    if len(spec.shape) != 4:
        raise DataError(f"an image manifest needs a 4-D model input; {spec.name!r} has shape {list(spec.shape)} "
                        f"({p.name} was read as a manifest for its {opts.path_column!r} column: pass --features to read it as a table)")
    c_axis, h_axis, w_axis = (1, 2, 3) if opts.layout == "NCHW" else (3, 1, 2)
    channels = spec.shape[c_axis]
    fixed = tuple(d if isinstance(d, int) else None for d in (spec.shape[h_axis], spec.shape[w_axis]))
    if opts.size is None and None in fixed:
        raise UsageError(f"the model's image size is symbolic; pass --image-size H,W or --input-shape {spec.name}=...")
    size = opts.size or fixed
    if any(f is not None and f != s for f, s in zip(fixed, size)):  # said before any image is read
        shown = "x".join("?" if f is None else str(f) for f in fixed)
        raise UsageError(f"--image-size {size[0]},{size[1]} differs from the {shown} (H x W) that the model or "
                         f"--input-shape fixes for {spec.name!r}; drop --image-size or make the two agree")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels if isinstance(channels, int) else 3)
    if mode is None:
        raise DataError(f"model input {spec.name!r} {list(spec.shape)} has {channels} channels under --layout "
                        f"{opts.layout}; images need 1, 3 or 4: check --layout (NCHW puts channels second, NHWC last)")
    for opt, values in (("--mean", opts.mean), ("--std", opts.std)):
        if len(values) not in (1, len(mode)):
            raise UsageError(f"{opt} has {len(values)} values but the model's images have {len(mode)} channels; "
                             f"give one value or {len(mode)}")
    mean = np.asarray(opts.mean, dtype=np.float32)
    std = np.asarray(opts.std, dtype=np.float32)
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise UsageError("--mean and --std need finite numbers and --std positive ones; fix those values")
    paths = table[opts.path_column]
    empty = _missing(paths.to_numpy(dtype=object))
    if empty.any():
        rows = ", ".join(str(i + 1) for i in np.flatnonzero(empty)[:5]) + (", ..." if empty.sum() > 5 else "")
        raise DataError(f"{p.name} has an empty {opts.path_column!r} cell in {int(empty.sum())} rows (data rows {rows}, "
                        "counting from 1); fill in the image paths or drop those rows")
    images, converted, resized = [], {}, 0
    for rel in paths.astype(str):
        f = (p.parent / rel) if not Path(rel).is_absolute() else Path(rel)
        try:
            with warnings.catch_warnings():  # Pillow's notes on odd files are not the user's business
                warnings.simplefilter("ignore", UserWarning)  # its decompression-bomb warning is a RuntimeWarning
                with Image.open(f) as im:
                    if im.mode != mode:
                        converted[im.mode] = converted.get(im.mode, 0) + 1
                    resized += im.size != (size[1], size[0])
                    arr = _pixels(im, mode, size, rel)
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"image {rel} listed in {p.name} not found; paths are relative to the manifest") from None
        except Exception as exc:
            raise DataError(f"cannot read image {rel} ({type(exc).__name__}); give a PNG, JPEG or another format "
                            "Pillow opens, or drop that row from the manifest") from None
        images.append(arr.reshape(size[0], size[1], -1))
    notes = []
    if converted:
        notes.append(f"converted {sum(converted.values())} to {mode} (from {', '.join(sorted(converted))})")
    if resized and opts.size is None:  # an explicit --image-size asked for the resize
        notes.append(f"resized {resized} to {size[0]}x{size[1]} (H x W, the model's input)")
    if notes:
        warn_once(f"{p.name}: of {len(images)} images, {' and '.join(notes)}")
    x = np.stack(images)  # N, H, W, C
    with np.errstate(over="ignore"):
        x = (x - mean) / std
    if not np.isfinite(x).all():
        raise UsageError(f"--mean {','.join(f'{m:g}' for m in opts.mean)} and --std {','.join(f'{s:g}' for s in opts.std)} "
                         "take the pixels (scaled to [0, 1]) beyond float32; give the data set's per-channel mean and "
                         "std, e.g. --mean 0.5 --std 0.25")
    if opts.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    x = _conform(spec.name, x, spec)
    return {spec.name: x}, _labels(table[label].to_numpy(), label)
