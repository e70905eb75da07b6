"""Which torch device a --device option means; shared by every command that runs the interpreter."""

from __future__ import annotations

import os

import torch

from onnxfair.errors import RuntimeUnavailableError, UsageError


def torch_device(name: str) -> torch.device:
    """auto: cuda when torch sees a GPU, else cpu; cuda without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeUnavailableError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu or cuda")
    if name == "cuda":
        deterministic_cuda()
    return torch.device(name)


def deterministic_cuda() -> None:
    """Identical inputs must give identical masks: by default cuDNN picks kernels by timing and some of them,
    like cuBLAS's split reductions and the scatter-adds behind an embedding's gradient, add in a varying
    order. Ask for the reproducible ones (a warning, not an error, where an op has none)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
