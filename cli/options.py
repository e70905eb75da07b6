"""Options shared by several commands, and the small I/O helpers the commands use."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable

import click

from onnxfair.data import ImageOptions, load_datasets, parse_groups
from onnxfair.errors import UsageError
from onnxfair.model import load_model, parse_input_shapes, write_text_atomic


def data_options(f: Callable, required: bool = True) -> Callable:
    """--data, --groups, --label, --features and the image-manifest options."""
    for opt in reversed(
        [
            click.option("--data", "data", required=required, type=click.Path(dir_okay=False), help="Labelled data: .npz, .csv, .parquet or an image manifest .csv."),
            click.option("--groups", required=required, help="Group attribute(s), comma-separated for intersections: race or race,sex."),
            click.option("--label", default=None, help="Label array/column (default: y in npz, label in tables)."),
            click.option("--features", default=None, help="Feature columns in order, comma-separated (tables; default: all but label and groups)."),
            click.option("--image-size", default=None, help="Images: H,W to resize to (default: the model's input size)."),
            click.option("--mean", default="0", help="Images: per-channel mean after scaling to [0,1], comma-separated."),
            click.option("--std", default="1", help="Images: per-channel std, comma-separated."),
            click.option("--layout", default="NCHW", type=click.Choice(["NCHW", "NHWC"]), help="Images: tensor layout."),
        ]
    ):
        f = opt(f)
    return f


def data_options_optional(f: Callable) -> Callable:
    """The data options for commands that also work data-free."""
    return data_options(f, required=False)


def runtime_options(f: Callable) -> Callable:
    for opt in reversed(
        [
            click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help="onnxruntime provider."),
            click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1), help="Inference batch size."),
            click.option("--latency-batch", default=1, show_default=True, type=click.IntRange(1), help="Batch size for latency timing."),
            click.option("--input-shape", "input_shape", multiple=True, help="Fix symbolic dims: NAME=d0,d1,... (repeatable)."),
        ]
    ):
        f = opt(f)
    return f


def _floats(text: str, name: str) -> tuple[float, ...]:
    """Finite numbers only: a NaN mean or std would surface later as NaN inputs, far from its cause."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a comma-separated list of numbers; give e.g. {name} 0.5,0.5,0.5") from None
    if not all(math.isfinite(v) for v in vals):
        raise UsageError(f"{name} {text!r} has a non-finite value; give finite numbers, e.g. {name} 0.5,0.5,0.5")
    return vals


def _image_size(text: str) -> tuple[int, int]:
    """Whole positive pixels: truncating 32.7 or passing 0 on to the image reader would hide the mistake."""
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise UsageError(f"--image-size {text!r} must be two positive whole numbers H,W; give e.g. --image-size 224,224")
    return h, w


def image_options(kw: dict[str, Any]) -> ImageOptions:
    """The image-manifest options (--image-size, --mean, --std, --layout) as ImageOptions."""
    size = _image_size(kw["image_size"]) if kw.get("image_size") else None
    std = _floats(kw.get("std", "1"), "--std")
    if any(v <= 0 for v in std):
        raise UsageError(f"--std {kw.get('std')!r} has a value <= 0; give positive standard deviations")
    return ImageOptions(size=size, mean=_floats(kw.get("mean", "0"), "--mean"), std=std, layout=kw.get("layout", "NCHW"))


def load_data(paths: list[str | None], model, kw: dict[str, Any], input_shapes: dict[str, tuple[int, ...]] | None = None):
    """The datasets (None for a path not given) for `model` from the parsed data options, shared by the files:
    --features reaches the tables, the image options the manifests; --features makes a manifest a table."""
    image = image_options(kw)
    if kw.get("label") is not None and not kw["label"].strip():  # was taken as not given: the default column
        raise UsageError("--label is empty; give the label column's name (default: label in a table, y in an npz)")
    features = [c.strip() for c in kw["features"].split(",")] if kw.get("features") is not None else None
    if features is not None and not all(features):
        raise UsageError(f"--features {kw['features']!r} has an empty column name; list the feature columns, "
                         "comma-separated")
    return load_datasets(paths, model, parse_groups(kw["groups"]), label=kw.get("label"), features=features,
                         image=image, input_shapes=input_shapes)


def emit_json(obj: Any, target: str | None) -> None:
    """--json -: stdout holds only the JSON document; --json PATH: atomic write."""
    if not target:
        return
    from onnxfair.report import json_safe

    # strict JSON: a NaN or infinite figure is null, never a bare NaN token that parsers reject
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, default=_jsonable, allow_nan=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
    else:
        write_text_atomic(text, target)


def _jsonable(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def progress(message: str) -> None:
    """Per-stage progress lines on stderr; stdout stays clean for --json -."""
    click.echo(message, err=True)


__all__ = ["data_options", "runtime_options", "load_data", "emit_json", "progress", "load_model", "parse_input_shapes"]
