"""stairs engine: token-exact speculative T5 generation on ONNX Runtime with numpy only.

Never imports torch, transformers or optimum.
"""

from .accept import accept, accept_path
from .api import Engine, GenerationResult, Health
from .errors import (
    CancelledError,
    EngineError,
    InputError,
    ModelFileError,
    NonFiniteLogitsError,
    PairMismatchError,
    ProviderError,
)
from .options import Limits, LoadConfig
from .stats import Stats
from .strategies import STRATEGIES

__all__ = [
    "STRATEGIES",
    "CancelledError",
    "Engine",
    "EngineError",
    "GenerationResult",
    "Health",
    "InputError",
    "Limits",
    "LoadConfig",
    "ModelFileError",
    "NonFiniteLogitsError",
    "PairMismatchError",
    "ProviderError",
    "Stats",
    "accept",
    "accept_path",
]
