"""T5 tokenisation with sentencepiece, matching Hugging Face's T5Tokenizer ids."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from .errors import ModelFileError
from .verify import read_json

log = logging.getLogger("stairs")
DEFAULT_MAX_INPUT = 512  # T5's pre-training input length
# Hugging Face writes int(1e30) when a checkpoint records no limit: that means "no limit known".
NO_LIMIT = 1_000_000


class Tokenizer:
    """sentencepiece pieces plus T5's special tokens (</s>, <pad>, <unk>, <extra_id_N>)."""

    def __init__(
        self,
        spiece: Path,
        vocab_size: int,
        eos_id: int,
        pad_id: int,
        tokenizer_config: Path | None = None,
    ):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(spiece))
        except Exception as exc:
            raise ModelFileError(f"{spiece}: not a sentencepiece model ({exc})") from exc
        self.n_pieces = self.sp.get_piece_size()
        self.eos_id, self.pad_id = eos_id, pad_id
        # T5 appends 100 sentinel ids after the pieces, <extra_id_0> last (HF's convention).
        self.n_extra = 100 if vocab_size >= self.n_pieces + 100 else 0
        specials = {"</s>": eos_id, "<pad>": pad_id, "<unk>": self.sp.unk_id()}
        specials.update(
            {f"<extra_id_{i}>": self.n_pieces + self.n_extra - 1 - i for i in range(self.n_extra)}
        )
        self.specials = specials
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
        self.max_input_tokens = DEFAULT_MAX_INPUT
        if tokenizer_config and tokenizer_config.is_file():
            self.max_input_tokens = _max_length(tokenizer_config)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, special tokens recognised, without the trailing EOS."""
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids) -> str:
        """Text of ids, special tokens and sentinels left out."""
        return self.sp.decode(
            [int(i) for i in ids if i < self.n_pieces and i not in (self.eos_id, self.pad_id)]
        )


def _max_length(path: Path) -> int:
    """model_max_length of tokenizer_config.json; a damaged file is a ModelFileError, a value
    that is not a positive integer is ignored (with a warning) for T5's default of 512."""
    n = read_json(path, dict).get("model_max_length")
    if isinstance(n, int) and not isinstance(n, bool) and 0 < n:
        return n if n < NO_LIMIT else DEFAULT_MAX_INPUT
    if n is not None:
        log.warning(
            "%s: model_max_length %r is not a positive integer; using %d",
            path,
            n,
            DEFAULT_MAX_INPUT,
        )
    return DEFAULT_MAX_INPUT


def text_pieces(chunks: Iterable[list[int]], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Text pieces of token chunks as they come, each the new end of the decoded text; held back
    while the text ends in a partial UTF-8 character (U+FFFD), flushed at the end."""
    ids: list[int] = []
    shown = ""
    text = ""
    for chunk in chunks:
        ids += chunk
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown) :]
        shown = text
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown) :]
