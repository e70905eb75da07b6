"""`OnnxModule`: an ONNX graph as a differentiable torch module whose parameters keep their ONNX names.

The forward pass is generated Python source (as torch.fx does): one line per kernel call, values in local
variables, each intermediate deleted after its last use. There is no per-call dictionary traffic, so the
interpreter costs about what the same layers cost as a hand-written module.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxfair.errors import ModelError, NoOutputsError, UnsupportedError, UsageError
from onnxfair.interpret.compile import Plan, build_plan, refusal_message
from onnxfair.model import batch_axis_hint, batch_candidates


_GENERATED = "<onnxfair.interpret generated forward>"


def unsupported_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op types (domain-qualified outside the default domain, or `Op(attribute)`) that cannot be
    interpreted faithfully, with their counts; empty when the whole graph is supported."""
    return dict(build_plan(model).refusals)


def _identifier_map(plan: Plan) -> dict[str, str]:
    names: dict[str, str] = {}
    for i, n in enumerate(plan.input_names):
        names[n] = f"i{i}"
    for i, n in enumerate(plan.params):
        names[n] = f"p{i}"
    for i, n in enumerate(plan.consts):
        names[n] = f"c{i}"
    k = 0
    for s in plan.steps:
        for o in s.outputs:
            if o and o not in names:
                names[o] = f"v{k}"
                k += 1
    return names


def _generate(plan: Plan) -> tuple[str, list, dict[int, str]]:
    """Source of `_make(FNS) -> _run(P, C, *inputs)`, the kernels it closes over, and line → node label."""
    ids = _identifier_map(plan)
    used = {n for s in plan.steps for n in s.inputs if n} | set(plan.output_names)
    last_use: dict[str, int] = {}
    for k, s in enumerate(plan.steps):
        for n in s.inputs:
            if n:
                last_use[n] = k
    keep = set(plan.output_names)
    frees: dict[int, list[str]] = {}
    for n, k in last_use.items():
        if n not in keep and ids[n][0] in "vi":
            frees.setdefault(k, []).append(ids[n])

    fns = [s.fn for s in plan.steps]
    body: list[str] = []
    body_lines: dict[int, str] = {}
    if plan.params:
        targets = [ids[n] if n in used else "_" for n in plan.params]
        body.append(", ".join(targets) + ", = P")
    if plan.consts:
        targets = [ids[n] if n in used else "_" for n in plan.consts]
        body.append(", ".join(targets) + ", = C")
    for k, s in enumerate(plan.steps):
        args = ", ".join(ids[n] if n else "None" for n in s.inputs)
        body_lines[len(body)] = f"{s.node.op_type} {s.node.name or s.outputs[0]!r}"
        if len(s.outputs) == 1:
            body.append(f"{ids[s.outputs[0]]} = f{k}({args})")
        else:
            body.append(f"_t = f{k}({args})")
            for j, o in enumerate(s.outputs):
                if o:
                    body.append(f"{ids[o]} = _t[{j}]")
            body.append("del _t")
        if k in frees:
            body.append("del " + ", ".join(sorted(frees[k])))
    outs = [ids[n] for n in plan.output_names]
    body.append(f"return {outs[0]}" if len(outs) == 1 else f"return ({', '.join(outs)},)")

    args = ", ".join(["P", "C"] + [ids[n] for n in plan.input_names])
    lines = ["def _make(FNS):"]
    if fns:
        lines.append("    " + ", ".join(f"f{k}" for k in range(len(fns))) + ", = FNS")
    lines.append(f"    def _run({args}):")
    first = len(lines) + 1  # 1-based line number of the body's first line
    lines += ["        " + b for b in body]
    lines.append("    return _run")
    return "\n".join(lines) + "\n", fns, {first + k: label for k, label in body_lines.items()}


def _check_output_names(plan: Plan) -> None:
    if not plan.output_names:
        raise NoOutputsError()
    produced = set(plan.input_names) | set(plan.params) | set(plan.consts)
    produced |= {o for s in plan.steps for o in s.outputs if o}
    for n in plan.output_names:
        if n not in produced:
            raise ModelError(f"graph output {n!r} is produced by no node; the graph is malformed")


def _rows(args: tuple) -> int | None:
    """The leading dim of the first tensor input (the batch of a classifier's inputs)."""
    first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _n_rows(n: int) -> str:
    return f"{n} row{'' if n == 1 else 's'}"


def batch_output(out: Any, rows: int, inputs: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The first graph output of a call on `rows` rows, refused when it has not one row per input row (a
    shape hard-coded to batch 1, such as Reshape(x, [1, -1]), folds the whole batch into one row)."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.dim() == 0 and rows == 1:  # a head that squeezes every unit axis gives a row a scalar
        out = out.reshape(1)
    if out.dim() == 0 or out.shape[0] != rows:
        hint = batch_axis_hint({k: tuple(v.shape) for k, v in (inputs or {}).items()}, out.shape[0]) if out.dim() else ""
        raise ModelError(
            f"the model returned {tuple(out.shape)} for a batch of {rows} rows{hint or ': a shape in the graph '}"
            f"{'' if hint else 'hard-codes the batch size; re-export the model with a dynamic batch axis'}")
    return out


# what torch raises inside a kernel (a shape that does not fit, an index out of range), with the ONNX node
# added as a note
INTERPRETER_ERRORS = (RuntimeError, IndexError)


def one_line(exc: BaseException) -> str:
    """An interpreter error and its notes (the ONNX node) on one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    notes = "; ".join(getattr(exc, "__notes__", []))
    return f"{text}{', ' + notes if notes else ''}"


def checked_output(mod: "OnnxModule", inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`batch_output` of `mod` on `inputs`, refused when gradients are being recorded for weights that cannot
    reach the output (an ArgMax or Hardmax head): the backward pass would fail with an obscure torch error."""
    try:
        raw = mod(**inputs)
    except INTERPRETER_ERRORS as exc:  # torch's own error: one line for the commands
        fix = ("check that the data's integer inputs hold values the graph can index with (token ids below the "
               "vocabulary size, say)" if isinstance(exc, IndexError) else
               "check that each input array has the shape the graph expects, rows along dim 0 (or lower "
               "--batch-size if memory ran out)")
        raise ModelError(f"the interpreter cannot run the model on the data ({one_line(exc)}); {fix}") from None
    rows = next(iter(inputs.values())).shape[0]
    first = raw[0] if isinstance(raw, (tuple, list)) else raw
    if rows == 1 and first.dim() and first.shape[0] != 1:  # a squeezed head at one row: run it twice, keep one
        raw = mod(**{k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in inputs.items()})
        raw = (raw[0] if isinstance(raw, (tuple, list)) else raw)[:1]
    out = batch_output(raw, rows, inputs)
    if not out.is_floating_point():  # class indices (an ArgMax head): no scores to take a loss on, with or without grad
        raise UnsupportedError(
            f"the model's first output holds {str(out.dtype).removeprefix('torch.')} values (class indices, say), not "
            "class scores; re-export the model with its class scores (logits or probabilities) as the first output")
    if torch.is_grad_enabled() and not out.requires_grad and any(p.requires_grad for p in mod.parameters()):
        cut = mod.gradient_cut(inputs)
        raise UnsupportedError(
            f"the model's first output does not depend differentiably on the weights "
            f"({'ONNX node ' + cut if cut else 'no weight reaches it'}); re-export the model with its class scores "
            "(logits or probabilities) as the first output")
    return out


class OnnxModule(nn.Module):
    """An ONNX graph as an `nn.Module` (eval semantics, symbolic batch, CPU or CUDA).

    Float initializers are `nn.Parameter`s reachable as `mod.params[onnx_name]`; integer tensors and
    Constant nodes are non-trainable buffers. Masks (`set_masks`) multiply parameters in the forward
    pass; `to_onnx` writes the current values back under the same names and dtypes.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            raise UsageError("OnnxModule needs an onnx.ModelProto; load the file with onnxfair.model.load_model")
        plan = build_plan(model)
        if plan.refusals:
            raise UnsupportedError(refusal_message(plan.refusals))
        _check_output_names(plan)
        self.opset = plan.opset
        # batches a graph that hard-codes its batch may run at, the declared one first
        self._batch_candidates = (1, *batch_candidates(model))
        self.input_names: list[str] = list(plan.input_names)
        self.output_names: list[str] = list(plan.output_names)
        self._param_names: list[str] = list(plan.params)
        self._param_index = {n: i for i, n in enumerate(self._param_names)}
        self._param_types = dict(plan.param_types)
        self._param_sparse = set(plan.param_sparse)
        self._params = nn.ParameterList([nn.Parameter(t, requires_grad=True) for t in plan.params.values()])
        self._consts = _Buffers()
        for i, t in enumerate(plan.consts.values()):
            self._consts.register_buffer(str(i), t, persistent=False)
        self._masks = _Buffers()
        self._const_names: list[str] = list(plan.consts)
        self._steps = plan.steps
        # graphs a kernel runs itself (If's branches): children, so device and dtype moves reach them
        self._branches = nn.ModuleList(m for step in plan.steps for m in getattr(step.fn, "submodules", ()))
        src, fns, self._line_nodes = _generate(plan)
        self.code = src
        scope: dict[str, Any] = {}
        exec(compile(src, _GENERATED, "exec"), scope)
        self._run = scope["_make"](fns)

    # The forward pass reads the tensors from the containers' dicts on every call, so `.to()`, `.double()`,
    # `load_state_dict` and `torch.func.functional_call` (keys `_params.<i>`) are all honoured.

    def _param_values(self) -> list[torch.Tensor]:
        return list(self._params._parameters.values())

    # -- public API ----------------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, nn.Parameter]:
        """ONNX float initializer name → Parameter (a fresh dict; the Parameters are the module's own)."""
        return dict(zip(self._param_names, self._param_values()))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != len(self.input_names):
            args = self._bind(args, kwargs)
        P = list(self._params._parameters.values())
        masks = self._masks._buffers
        if masks:
            for k, m in masks.items():
                i = int(k)
                P[i] = P[i] * m
        try:
            return self._run(P, list(self._consts._buffers.values()), *args)
        except Exception as exc:  # name the ONNX node that failed (free in CPython >= 3.11 until raised)
            tb, line = exc.__traceback__, None
            while tb is not None:
                if tb.tb_frame.f_code.co_filename == _GENERATED:
                    line = tb.tb_lineno
                tb = tb.tb_next
            node = self._line_nodes.get(line)
            rows = _rows(args)
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            pinned = self._pinned_batch(P, args, rows) if isinstance(exc, RuntimeError) and rows else None
            if pinned is not None:
                raise ModelError(
                    f"the model fails on a batch of {_n_rows(rows)} (ONNX node {node}: {text}) but runs on "
                    f"{'one row' if pinned == 1 else _n_rows(pinned)}: a shape in the graph hard-codes the batch size; "
                    "re-export the model with a dynamic batch axis") from exc
            if node is not None and hasattr(exc, "add_note"):
                exc.add_note(f"while running ONNX node {node}")
            raise

    def _pinned_batch(self, P: list, args: tuple, rows: int) -> int | None:
        """The batch a failure on `rows` rows is pinned to, if the batch size itself is the cause: the graph runs
        on the first row repeated to 1, to the batch the inputs declare or to one a Reshape constant names, but
        fails on it repeated `rows` times (so the data, or memory, are not the cause). None otherwise."""
        consts = list(self._consts._buffers.values())

        def runs(n: int) -> bool:
            feed = tuple(a[:1].repeat((n,) + (1,) * (a.dim() - 1))
                         if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == rows else a for a in args)
            try:
                with torch.no_grad():
                    self._run(P, consts, *feed)
            except Exception as exc:
                if "memory" in str(exc).lower():
                    raise
                return False
            return True

        try:
            batch = next((b for b in dict.fromkeys(self._batch_candidates) if b != rows and runs(b)), None)
            return batch if batch is not None and not runs(rows) else None
        except Exception:  # out of memory while probing: not a pinned batch
            return None

    def gradient_cut(self, inputs: Mapping[str, torch.Tensor]) -> str | None:
        """The node nearest the first output after which no gradient flows back from it (a value that needs
        none made from one that does), as "Op 'name'"; None when no weight reaches the output at all."""
        consts = self._consts._buffers.values()
        values: dict[str, Any] = {**dict(zip(self._param_names, self._param_values())),
                                  **dict(zip(self._const_names, consts)),
                                  **dict(zip(self.input_names, self._bind((), dict(inputs))))}
        cut: dict[str, str | None] = {}  # value name -> the node that cut its gradient
        with torch.enable_grad():
            for s in self._steps:
                ins = [n for n in s.inputs if n]
                res = s.fn(*(values[n] if n else None for n in s.inputs))
                res = res if len(s.outputs) > 1 else (res,)
                grad_in = any(getattr(values[n], "requires_grad", False) for n in ins)
                label = f"{s.node.op_type} {s.node.name or s.outputs[0]!r}"
                for o, r in zip(s.outputs, res):
                    if o:
                        values[o] = r
                        if not getattr(r, "requires_grad", False):
                            cut[o] = label if grad_in else next((cut[n] for n in ins if cut.get(n)), None)
        return cut.get(self.output_names[0])

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        if len(args) > len(self.input_names):
            raise UsageError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(args)}")
        values = dict(zip(self.input_names, args))
        for k, v in kwargs.items():
            if k not in self.input_names:
                raise UsageError(f"{k!r} is not a model input; inputs: {', '.join(self.input_names)}")
            if k in values:
                raise UsageError(f"input {k!r} given twice")
            values[k] = v
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise UsageError(f"missing model inputs: {', '.join(missing)}")
        return tuple(v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for v in (values[n] for n in self.input_names))

    def set_masks(self, masks: Mapping[str, Any] | None) -> None:
        """Multiply parameters by masks in every forward pass; replaces the previous set (None clears)."""
        new: dict[str, torch.Tensor] = {}
        values = self._param_values()
        for name, mask in (masks or {}).items():
            i = self._param_index.get(name)
            if i is None:
                raise UsageError(f"mask for {name!r}, which is not a float initializer of the model")
            p = values[i]
            m = torch.as_tensor(mask)
            if tuple(m.shape) != tuple(p.shape):
                raise UsageError(f"mask for {name!r} has shape {tuple(m.shape)}, the parameter has {tuple(p.shape)}")
            new[str(i)] = m.detach().to(device=p.device, dtype=p.dtype)
        self._masks._buffers.clear()
        for k in sorted(new, key=int):
            self._masks.register_buffer(k, new[k], persistent=False)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """ONNX initializer name → mask currently applied."""
        return {self._param_names[int(k)]: m for k, m in self._masks._buffers.items()}

    def masked_params(self) -> dict[str, torch.Tensor]:
        """Current effective (masked) values, detached."""
        masks = self._masks._buffers
        out = {}
        for i, (n, p) in enumerate(zip(self._param_names, self._param_values())):
            m = masks.get(str(i))
            out[n] = (p * m if m is not None else p).detach()
        return out

    def to_onnx(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` with the current (masked) parameter values, same names, dtypes and shapes."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        inits = {t.name: t for t in out.graph.initializer}
        values = self.masked_params()
        for name, value in values.items():
            elem = self._param_types[name]
            new = _to_proto(value, name, elem)
            if name in self._param_sparse:
                keep = [s for s in out.graph.sparse_initializer if s.values.name != name]
                del out.graph.sparse_initializer[:]
                out.graph.sparse_initializer.extend(keep)
                out.graph.initializer.append(new)
                continue
            init = inits.get(name)
            if init is None:
                raise ModelError(f"the model has no initializer {name!r}; pass the model this module was built from")
            if tuple(init.dims) != tuple(value.shape):
                raise ModelError(f"initializer {name!r} has shape {tuple(init.dims)}, the module {tuple(value.shape)}")
            doc = init.doc_string
            init.CopyFrom(new)
            init.doc_string = doc
        return out

    def extra_repr(self) -> str:
        return f"opset={self.opset}, inputs={self.input_names}, outputs={self.output_names}"


class _Buffers(nn.Module):
    """A bag of non-persistent buffers keyed "0", "1", ... (constants, masks)."""

    def forward(self) -> None:  # pragma: no cover - a container, never called
        raise RuntimeError("not callable")


def _to_proto(value: torch.Tensor, name: str, elem: int) -> onnx.TensorProto:
    t = value.detach().cpu()
    if elem == TensorProto.BFLOAT16:
        raw = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), raw, raw=True)
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    return numpy_helper.from_array(t.to(torch.float64 if elem == TensorProto.DOUBLE else torch.float32).numpy().astype(np_dtype), name)
