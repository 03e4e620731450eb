"""stairs export: Hugging Face T5 checkpoints -> validated ONNX folders (needs torch, optimum)."""

from .core import ExportResult, check_pair, export_model
from .errors import (
    CheckpointError,
    ExportError,
    OutputExistsError,
    PairMismatchError,
    ValidationError,
)

__all__ = [
    "CheckpointError",
    "ExportError",
    "ExportResult",
    "OutputExistsError",
    "PairMismatchError",
    "ValidationError",
    "check_pair",
    "export_model",
]
