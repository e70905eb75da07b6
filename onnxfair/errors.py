"""One exception hierarchy: the CLI turns any of these into one line on stderr and exit code 2."""


class OnnxfairError(Exception):
    """Base class: a problem with the user's input that they can fix; the message says how."""

    exit_code = 2


class ModelError(OnnxfairError):
    """The model file is missing, not ONNX, rejected by the checker, or cannot be handled faithfully."""


class DataError(OnnxfairError):
    """The data file does not match the model or lacks a label/group column."""


class UnsupportedError(OnnxfairError):
    """The graph holds ops or patterns onnxfair refuses to approximate."""


class RuntimeUnavailableError(OnnxfairError):
    """onnxruntime is missing or the requested execution provider is not available."""


class UsageError(OnnxfairError):
    """Options that contradict each other or are out of range."""


class NoOutputsError(ModelError):
    """A graph without outputs: nothing to score, whichever runner (onnxruntime or the interpreter) meets it."""

    def __init__(self) -> None:
        super().__init__("the model has no graph outputs; re-export it with the class scores as its first output")
