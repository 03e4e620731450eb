"""The Engine: load a main/assistant pair, generate token-exact greedy output, fast."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, PairMismatchError
from .model import T5Model
from .run import Run
from .stats import Stats
from .strategies import NEEDS_ASSISTANT, STRATEGIES

PAIR_KEYS = ["vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id"]


@dataclass(frozen=True)
class GenerationResult:
    """token_ids: generated ids after the decoder start (EOS included if generated);
    strategy: the one that ran ('auto' resolved)."""

    token_ids: list[int]
    text: str
    stats: Stats
    strategy: str


class Engine:
    """A main T5 model and optionally its assistant, each an exported ONNX folder."""

    def __init__(self, main: T5Model, assistant: T5Model | None = None, threads: int | None = None):
        self.main, self.assistant, self.threads = main, assistant, threads
        self._auto: tuple[str, dict] | None = None
        if assistant is not None:
            diffs = [
                f"{k}: main {main.config.get(k)} vs assistant {assistant.config.get(k)}"
                for k in PAIR_KEYS
                if main.config.get(k) != assistant.config.get(k)
            ]
            if diffs:
                raise PairMismatchError(
                    f"{main.folder} and {assistant.folder} are not a pair: " + "; ".join(diffs)
                )

    @classmethod
    def load(
        cls,
        main: str | Path,
        assistant: str | Path | None = None,
        provider: str = "cpu",
        threads: int | None = None,
        provider_options: dict | None = None,
        assistant_provider: str | None = None,
        shared_thread_pool: bool = False,
        assistant_threads: int | None = None,
        io_binding: bool = False,
    ) -> Engine:
        """Load exported folders; provider is cpu, cuda, coreml or auto (assistant may differ).

        shared_thread_pool: one process-wide ORT pool (fastest on few cores), usable only if no
        ORT session exists yet; every later session of the process must then opt out of
        per-session threads. assistant_threads: the small assistant's ops can be too short to gain
        from a second thread (None = what stairs-tune measured for this pair, else threads).
        io_binding: run through ORT IO binding (outputs allocated on the provider's device).
        """
        m = T5Model(
            main, provider, threads, provider_options, "main", shared_thread_pool, io_binding
        )
        a = None
        if assistant is not None:
            if assistant_threads is None:  # what stairs-tune measured, else the main's count
                from .tune import stored_assistant_threads

                assistant_threads = stored_assistant_threads(main, assistant, m.provider, threads)
            a_threads = threads if assistant_threads is None else assistant_threads
            a = T5Model(
                assistant,
                assistant_provider or provider,
                a_threads,
                provider_options,
                "assistant",
                shared_thread_pool,
                io_binding,
            )
        return cls(m, a, threads)

    def calibrate(self, prompts, max_new_tokens: int = 64, save: bool = True) -> dict:
        """Measure every candidate strategy on prompts; store and use the fastest for 'auto'."""
        from . import tune

        result = tune.calibrate(self, prompts, max_new_tokens, save)
        self._auto = (result["strategy"], result["options"])
        return result

    def auto_choice(self) -> tuple[str, dict]:
        """What strategy='auto' runs: the stored calibration, else a sensible default."""
        if self._auto is None:
            from . import tune

            stored = tune.load(self)
            self._auto = (stored["strategy"], stored["options"]) if stored else tune.default(self)
        return self._auto

    def encode(
        self,
        prompt: str | Sequence[int],
        max_input_tokens: int | None = None,
        truncation: str | None = None,
    ) -> np.ndarray:
        """Encoder input ids [1, S]: text gets sentencepiece + EOS; a list of ids is used as is."""
        tok = self.main.tokenizer
        limit = max_input_tokens or tok.max_input_tokens
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("empty prompt")
            ids = tok.encode(prompt)
            if truncation is not None and len(ids) + 1 > limit:
                if truncation not in ("left", "right"):
                    raise InputError(f"truncation must be 'left' or 'right', not {truncation!r}")
                ids = ids[len(ids) + 1 - limit :] if truncation == "left" else ids[: limit - 1]
            ids = ids + [tok.eos_id]
        else:
            ids = [int(i) for i in prompt]
            if not ids:
                raise InputError("empty list of input ids")
            bad = [i for i in ids if not 0 <= i < self.main.vocab_size]
            if bad:
                raise InputError(f"input ids out of range [0, {self.main.vocab_size}): {bad[:5]}")
        if len(ids) > limit:
            raise InputError(
                f"prompt is {len(ids)} tokens, over the limit of {limit}; "
                "pass truncation='left' or 'right' or raise max_input_tokens"
            )
        return np.array([ids], dtype=np.int64)

    def _run(
        self,
        prompt,
        strategy: str,
        max_new_tokens: int,
        max_input_tokens,
        truncation,
        options: dict,
    ) -> tuple[Run, Iterator[list[int]], str]:
        if strategy == "auto":
            strategy, auto_opts = self.auto_choice()
            options = {**auto_opts, **options}
        if strategy not in STRATEGIES:
            raise InputError(
                f"unknown strategy {strategy!r}; choose from auto, {', '.join(STRATEGIES)}"
            )
        if strategy in NEEDS_ASSISTANT and self.assistant is None:
            raise InputError(
                f"strategy {strategy!r} needs an assistant: Engine.load(main, assistant=DIR)"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        ids = self.encode(prompt, max_input_tokens, truncation)
        run = Run(self.main, self.assistant, ids, max_new_tokens)
        try:
            it = STRATEGIES[strategy](run, **options)
        except TypeError as exc:
            raise InputError(f"bad option for strategy {strategy!r}: {exc}") from exc
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        return run, it, strategy

    def generate(
        self,
        prompt: str | Sequence[int],
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        **options,
    ) -> GenerationResult:
        """Generate exactly the main model's greedy tokens with the chosen strategy."""
        run, it, resolved = self._run(
            prompt, strategy, max_new_tokens, max_input_tokens, truncation, options
        )
        for _ in it:
            pass
        ids = run.seq[1:]
        return GenerationResult(ids, self.main.tokenizer.decode(ids), run.stats(), resolved)

    def stream(
        self,
        prompt: str | Sequence[int],
        strategy: str = "greedy",
        max_new_tokens: int = 64,
        max_input_tokens: int | None = None,
        truncation: str | None = None,
        **options,
    ) -> Iterator[str]:
        """Yield text pieces as tokens are accepted (held back while a UTF-8 byte is partial)."""
        run, it, _ = self._run(
            prompt, strategy, max_new_tokens, max_input_tokens, truncation, options
        )
        shown = ""
        for _ in it:
            text = self.main.tokenizer.decode(run.seq[1:])
            if text.endswith("\ufffd") and not run.done:
                continue
            if len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown) :]
            shown = text
