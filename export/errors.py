"""Typed errors of the exporter: each says what went wrong and what to do."""


class ExportError(Exception):
    """Base class of every export failure."""


class OutputExistsError(ExportError):
    """The output folder exists and --force was not given."""


class CheckpointError(ExportError):
    """The source checkpoint is missing, unknown or cannot be loaded."""


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
