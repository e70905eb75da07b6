"""Sparse storage of unstructured-pruned weights (file size only).

onnxruntime densifies `sparse_initializer`s when it loads a model and gains no latency from zeros: this
helper only shrinks the file on disk. Use structured channel pruning (`prune_channels`) for speed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxfair.errors import UsageError
from onnxfair.model import FLOAT_TYPES


def to_sparse_storage(model: onnx.ModelProto, min_elements: int = 64) -> onnx.ModelProto:
    """A copy where float initializers with enough zeros are stored as ONNX `sparse_initializer`.

    An initializer moves only when its sparse form (non-zero values plus int64 linear indices) is
    smaller than the dense one; outputs are unchanged. onnxruntime densifies these tensors at load,
    so memory and latency are those of the dense model; only the serialized size shrinks. A bfloat16
    initializer large enough to be considered is a UsageError: it cannot be stored exactly.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep, sparse = [], []
    graph_inputs = {i.name for i in g.input}
    for init in g.initializer:
        if init.name in graph_inputs or int(np.prod(init.dims)) < min_elements or init.data_type not in FLOAT_TYPES:
            keep.append(init)
            continue
        if init.data_type == onnx.TensorProto.BFLOAT16:
            # Refused, not skipped: onnx < 1.19 (the floor is 1.16) reads bfloat16 as float32 or as a
            # structured uint16, so the stored or densified tensor would change type or its zeros go unseen.
            raise UsageError(f"initializer {init.name} is bfloat16, which sparse storage cannot keep exactly; "
                             "save without --sparse-storage")
        arr = numpy_helper.to_array(init)
        flat = arr.reshape(-1)
        nz = np.flatnonzero(flat)
        if nz.size * (flat.itemsize + 8) + 64 >= flat.nbytes or nz.size == 0:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[nz], init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), init.name + "_indices")
        sparse.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
    if sparse:
        del g.initializer[:]
        g.initializer.extend(keep)
        g.sparse_initializer.extend(sparse)
        # a dense type declared for a now-sparse tensor makes onnx's checker and shape inference fail
        moved = {sp.values.name for sp in sparse}
        kept_info = [vi for vi in g.value_info if vi.name not in moved]
        del g.value_info[:]
        g.value_info.extend(kept_info)
    return m


def to_dense_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse: every sparse_initializer written back as a dense initializer."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for sp in g.sparse_initializer:
        dense = np.zeros(int(np.prod(sp.dims)), dtype=helper.tensor_dtype_to_np_dtype(sp.values.data_type))
        idx = numpy_helper.to_array(sp.indices)
        vals = numpy_helper.to_array(sp.values)
        if idx.ndim == 2:
            idx = np.ravel_multi_index(tuple(idx.T), tuple(sp.dims))
        dense[idx] = vals
        g.initializer.append(numpy_helper.from_array(dense.reshape(tuple(sp.dims)), sp.values.name))
    del g.sparse_initializer[:]
    return m
