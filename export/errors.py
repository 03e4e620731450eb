"""Typed errors of the exporter: each says what went wrong and what to do."""


class ExportError(Exception):
    """Base class of every export failure."""


class OptionError(ExportError):
    """An option is out of its range (dtype, opset), found before any model loads."""


class OutputExistsError(ExportError):
    """The output folder exists and may not be replaced: no --force, or it holds something that
    is not a previous stairs export (named in the message)."""


class OutputConflictError(ExportError):
    """The output folder is, contains or lies inside a source checkpoint, or main and assistant
    would share one folder."""


class OutputWriteError(ExportError):
    """The output cannot be written: no permission, read-only file system or disk full."""


class CheckpointError(ExportError):
    """The source checkpoint is missing, unknown or cannot be loaded."""


class ConversionError(ExportError):
    """optimum / torch.onnx / ONNX Runtime failed while converting or checking the model."""


class MemoryNeedError(ExportError):
    """The machine has clearly less memory available than the export needs."""


class PairMismatchError(ExportError):
    """Main and assistant disagree on vocabulary or special token ids."""


class ValidationError(ExportError):
    """An exported ONNX file differs from PyTorch by more than the tolerance."""

    def __init__(self, file: str, output: str, max_diff: float, tolerance: float):
        self.file, self.output, self.max_diff, self.tolerance = file, output, max_diff, tolerance
        super().__init__(
            f"{file}: output '{output}' differs from PyTorch by {max_diff:.3g} "
            f"(tolerance {tolerance:.3g})"
        )


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during an export (raised like Ctrl-C's KeyboardInterrupt, so the same
    cleanup runs); nothing was changed at the target."""
