"""T5 tokenisation with sentencepiece, matching Hugging Face's T5Tokenizer ids."""

from __future__ import annotations

import functools
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
# Characters beyond a cut that a window of a long text is tokenized with again: ids both agree
# on are the whole text's (not a multiple of a piece length, so runs of one character differ)
WINDOW_CONTEXT = 251


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

    @functools.cached_property
    def longest_piece(self) -> int:
        """Characters of the vocabulary's longest piece (read on first use: ~10 ms for 32k
        pieces, which a load need not pay)."""
        return max(len(self.sp.id_to_piece(i)) for i in range(self.n_pieces))

    def max_chars(self, limit: int) -> int:
        """The character cap of a text for limit ids: what is read of a longer text. An id
        covers at most longest_piece characters; the factor 2 leaves room for what the
        normalizer drops. A text mostly of whitespace runs or of characters the vocabulary
        lacks (T5 v1.0 collapses both) can hold fewer ids than its characters suggest: it is
        still capped."""
        return 2 * self.longest_piece * (limit + 8)

    def encode_limited(
        self, text: str, limit: int, keep: str | None = None
    ) -> tuple[list[int], bool]:
        """encode(text) with work and memory bounded by limit, not by the text: (ids, fits).
        fits: the text is within max_chars(limit) and has at most limit ids. Otherwise: its last
        limit ids (keep='end'), its first (keep='start'), or ([], False) unread when over the
        character cap and the ids counted no further when not (keep=None). Over the cap, only
        the kept max_chars(limit) characters are tokenized (_encode_window)."""
        cap = self.max_chars(limit)
        if len(text) <= cap:
            ids = self.encode(text)
            if len(ids) <= limit:
                return ids, True
        elif keep is None:
            return [], False
        else:
            ids = self._encode_window(text, cap, keep)
        if keep is None:
            return ids, False
        return (ids[len(ids) - limit :] if keep == "end" else ids[:limit]), False

    def _encode_window(self, text: str, cap: int, keep: str) -> list[int]:
        """The ids of text's kept cap characters that the whole text's ids end (or start)
        with: the window is tokenized alone and with WINDOW_CONTEXT more characters at its cut,
        and only the ids both agree on are kept (those next to the cut depend on where it
        falls). Text that stays ambiguous for longer (a whitespace run over the context) keeps
        fewer ids."""
        wide = cap + WINDOW_CONTEXT
        if keep == "end":
            a, b = self.encode(text[-cap:]), self.encode(text[-wide:])
            n = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y), len(a))
            return a[len(a) - n :]
        a, b = self.encode(text[:cap]), self.encode(text[:wide])
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        return a[:n]

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
