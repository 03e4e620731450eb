"""stairs export: Hugging Face T5 checkpoints -> validated ONNX folders (needs torch, optimum)."""

from .core import ExportResult, check_pair, export_model
from .errors import (
    CheckpointError,
    ConversionError,
    ExportError,
    MemoryNeedError,
    OptionError,
    OutputConflictError,
    OutputExistsError,
    OutputWriteError,
    PairMismatchError,
    Terminated,
    ValidationError,
)

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ExportError",
    "ExportResult",
    "MemoryNeedError",
    "OptionError",
    "OutputConflictError",
    "OutputExistsError",
    "OutputWriteError",
    "PairMismatchError",
    "Terminated",
    "ValidationError",
    "check_pair",
    "export_model",
]
