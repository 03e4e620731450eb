"""Errors the engine raises; each message says what is wrong and, where it can, what to do."""


class EngineError(Exception):
    """Base class of every engine error."""


class ModelFileError(EngineError):
    """A model folder lacks a file, or a file is corrupt or truncated."""


class PairMismatchError(EngineError):
    """Main and assistant differ in vocabulary or special token ids."""


class ProviderError(EngineError):
    """An execution provider is unknown or did not load."""


class InputError(EngineError):
    """Bad generation input: empty prompt, too long, bad ids or settings."""


class NonFiniteLogitsError(EngineError):
    """A model produced NaN or inf logits."""

    def __init__(self, model: str, step: int):
        self.model, self.step = model, step
        super().__init__(f"{model} produced NaN/inf logits at decoder step {step}")


class CancelledError(EngineError):
    """The request was cancelled (Handle.cancel) before it finished."""
