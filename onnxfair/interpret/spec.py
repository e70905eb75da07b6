"""What an op implementation sees of one node at build time, the op registry, and dtype conversions.

An op implementation is a *factory*: it reads the node's attributes, opset and any input values known
before the first call (constants, folded shape arithmetic), and returns a kernel, a plain function of the
runtime input tensors. Parsing happens once, so a forward pass is a straight run of kernel calls.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxfair.errors import ModelError, UnsupportedError

Kernel = Callable[..., Any]
Factory = Callable[["NodeSpec"], Kernel]

REGISTRY: dict[str, Factory] = {}

DEFAULT_DOMAINS = ("", "ai.onnx")


def register(*op_types: str) -> Callable[[Factory], Factory]:
    """Declare a factory for one or more default-domain op types."""

    def deco(fn: Factory) -> Factory:
        for name in op_types:
            if name in REGISTRY:
                raise RuntimeError(f"op {name} registered twice")
            REGISTRY[name] = fn
        return fn

    return deco


class OpRefused(UnsupportedError):
    """An op is known but this use of it (an attribute value, a mode) cannot be matched exactly."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(f"{key}: {detail}" if detail else key)
        self.key = key


_ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}


def torch_dtype(elem_type: int) -> torch.dtype:
    """Torch dtype of an ONNX element type; strings, complex and 8-bit floats are refused."""
    try:
        return _ONNX_TO_TORCH[elem_type]
    except KeyError:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise OpRefused(f"dtype {name}", "no exact torch equivalent") from None


def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    """A CPU torch tensor holding an initializer or attribute tensor (bfloat16 kept as bfloat16)."""
    dtype = torch_dtype(t.data_type)
    try:
        arr = numpy_helper.to_array(t)
    except Exception as exc:  # external data missing, malformed raw_data
        raise ModelError(f"cannot read tensor {t.name!r} ({exc}); re-save the model with its data") from None
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True))


def sparse_to_dense(sp: onnx.SparseTensorProto) -> torch.Tensor:
    """Densify a sparse initializer the way onnxruntime does at load time."""
    values = tensor_from_proto(sp.values).reshape(-1)
    idx = tensor_from_proto(sp.indices).to(torch.int64)
    shape = tuple(int(d) for d in sp.dims)
    out = torch.zeros(int(np.prod(shape)) if shape else 1, dtype=values.dtype)
    if idx.dim() == 2:  # [NNZ, rank] coordinates
        strides = torch.tensor([int(np.prod(shape[i + 1 :])) for i in range(len(shape))], dtype=torch.int64)
        idx = (idx * strides).sum(1)
    out[idx.reshape(-1)] = values
    return out.reshape(shape)


class NodeSpec:
    """One node as its factory sees it: attributes, opset, and what is known before the first call."""

    def __init__(
        self,
        node: onnx.NodeProto,
        opset: int,
        consts: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self.node = node
        self.op_type = node.op_type
        self.name = node.name
        self.opset = opset
        self.inputs = list(node.input)
        outs = list(node.output)
        while outs and not outs[-1]:
            outs.pop()
        self.outputs = outs
        self.n_outputs = len(outs)
        self._consts = consts
        self._shapes = shapes
        self.static_inputs: set[int] = set()
        self.attrs: dict[str, Any] = {}
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH and node.op_type == "If":
                self.attrs[a.name] = a.g  # its branches: run by the If kernel
                continue
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise OpRefused(f"{node.op_type}(subgraph)", "nested graphs other than If's branches are not interpreted")
            if a.ref_attr_name:
                raise OpRefused(f"{node.op_type}(attribute reference)")
            v = helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [s.decode() for s in v]
            self.attrs[a.name] = v

    # -- attributes ---------------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def ints(self, name: str, default: Any = None) -> list[int] | None:
        v = self.attrs.get(name)
        return [int(i) for i in v] if v is not None else default

    # -- inputs ---------------------------------------------------------------------------------------
    def has(self, i: int) -> bool:
        return i < len(self.inputs) and self.inputs[i] != ""

    def is_const(self, i: int) -> bool:
        return self.has(i) and self.inputs[i] in self._consts

    def peek(self, i: int) -> np.ndarray | None:
        """Value of input i if known at build time, without claiming it (the kernel still gets it)."""
        if not self.is_const(i):
            return None
        t = self._consts[self.inputs[i]]
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    def const(self, i: int) -> np.ndarray | None:
        """Value of input i if known at build time, else None.

        A factory that gets a value here must not read runtime input i: the executor passes None in its
        place (so the constant need not be kept on the device).
        """
        if not self.is_const(i):
            return None
        self.static_inputs.add(i)
        t = self._consts[self.inputs[i]]
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()

    def const_list(self, i: int) -> list[int] | None:
        v = self.const(i)
        return None if v is None else [int(a) for a in v.reshape(-1)]

    def const_scalar(self, i: int) -> float | int | bool | None:
        v = self.const(i)
        if v is None:
            return None
        if v.size != 1:
            raise ModelError(f"{self.op_type} node {self.name!r}: input {i} must be a scalar, has shape {v.shape}")
        return v.reshape(-1)[0].item()

    def shape(self, i: int) -> tuple[int, ...] | None:
        """Static shape of input i when it is an initializer or constant, else None."""
        if not self.has(i):
            return None
        return self._shapes.get(self.inputs[i])

    def refuse(self, what: str, detail: str = "") -> OpRefused:
        return OpRefused(f"{self.op_type}({what})", detail)
