"""Output paths checked before any work: nothing a command writes may land on an input or on another output."""

from __future__ import annotations

import os
from pathlib import Path

from onnxfair.errors import UsageError


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _is_onnxfair_markdown(path: Path) -> bool:
    """True when `path` starts like a summary onnxfair wrote (`# onnxfair ...`), so rewriting it loses nothing."""
    from onnxfair.report import MARKDOWN_TITLE

    title = MARKDOWN_TITLE.encode()
    try:
        with open(path, "rb") as f:
            return f.read(len(title)) == title
    except OSError:
        return False


def _external_data_files(model_path: Path) -> list[Path]:
    """The files an ONNX model keeps its weights in (external data), read from the graph without loading them."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not a readable model: the command's own loading reports that
        return []
    files = []
    for t in _get_all_tensors(model):  # initializers and attribute tensors, subgraphs included
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), None)
            if location:
                files.append(model_path.parent / location)
    return list(dict.fromkeys(files))


def _with_external_data(inputs: dict[str, str | None]) -> dict[str, str | None]:
    out = dict(inputs)
    for name, source in inputs.items():
        if source and source.endswith(".onnx") and Path(source).is_file():
            for f in _external_data_files(Path(source)):
                out[f"{name}'s external data"] = str(f)
    return out


def _refuse_manifest_images(inputs: dict[str, str | None], named: list[tuple[str, Path]]) -> None:
    """An output onto an image a data manifest lists would overwrite the data set itself."""
    from onnxfair.data import manifest_images

    for name, source in inputs.items():
        if not source or not name.startswith("--"):
            continue
        images = {f.resolve() for f in manifest_images(source)}
        for option, target in named:
            if target.resolve() in images:
                raise UsageError(f"{option} {target} is an image listed in the input {name} {source}; refusing to "
                                 "overwrite it, choose another path")


def check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Refuse, before anything is computed, outputs that would overwrite an input (model or data), collide with
    each other, name a folder, or go to a folder that is missing or not writable. The Markdown twin of
    `--report` is named by no option, so an existing file there is replaced only when onnxfair wrote it.

    Both maps take an option name (as the user typed it) to a path; None is skipped, and `-` (stdout) is
    allowed for `--json` only.
    """
    named: list[tuple[str, Path]] = []
    for option, path in outputs.items():
        if path is None:
            continue
        if not path.strip():  # not "no output": an empty -o would otherwise be skipped or land in the working folder
            raise UsageError(f"{option} is empty; give a file path")
        if path == "-":
            if option != "--json":
                raise UsageError(f"{option} - is not supported; use --json - for the report on stdout")
            continue
        if path.endswith(("/", os.sep)):
            raise UsageError(f"{option} {path} names a folder; give a file path")
        named.append((option, Path(path)))
        if option == "--report":
            md = Path(path).with_suffix(".md")
            if md == Path(path):
                raise UsageError(f"--report {path} would be overwritten by its own Markdown summary; "
                                 "give --report a .json path (the summary goes beside it as .md)")
            named.append(("--report's Markdown summary", md))
            if md.is_file() and not _is_onnxfair_markdown(md):
                raise UsageError(f"--report {path} would replace {md}, which is not an onnxfair report; "
                                 "move that file or choose another --report path")
    inputs = _with_external_data(inputs)
    _refuse_manifest_images(inputs, named)
    for option, target in named:
        for name, source in inputs.items():
            if source and _same(target, Path(source)):
                raise UsageError(f"{option} {target} is the input {name}; refusing to overwrite it, choose another path")
        if target.is_dir():
            raise UsageError(f"{option} {target} is a folder; give a file path")
        folder = target.resolve().parent
        if not folder.is_dir():
            raise UsageError(f"output folder {target.parent} does not exist; create it or choose another {option} path")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"output folder {target.parent} is not writable; choose another {option} path")
    for i, (a, pa) in enumerate(named):
        for b, pb in named[i + 1:]:
            if _same(pa, pb):
                raise UsageError(f"{a} and {b} are the same file {pa}; choose different paths")
