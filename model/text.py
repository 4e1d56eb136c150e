"""``ByteTextTokenizer``: UTF-8 bytes as tokens, so every string is valid input.

Token ids: 0 = padding, 1 + b for byte b (1..256). ``NONE_ID`` (257) is not
produced by ``encode``; the model uses it for the learned "no condition" token
(conditionless tasks, condition dropout, classifier-free guidance).

Captions are case-insensitive: ``normalize_text`` (lower case, single spaces)
runs before encoding in the pipeline, so "A Green Square" is "a green square"
(the training captions are all lower case). ``unknown_words`` lists the words
of a prompt outside a checkpoint's training vocabulary (the pipeline warns
with ``UnknownWordsWarning``: byte-level input never fails, but a model asked
for "a purple star" draws something it knows).

Text longer than ``max_len`` bytes is truncated with a ``UserWarning`` (a cut
inside a multi-byte character is dropped by ``decode``). Untested: text that
mixes NUL bytes with padding (a NUL byte is id 1, padding 0, so it survives).
"""
from __future__ import annotations

import re
import warnings
from typing import Iterable, List, Sequence, Tuple, Union

import torch

PAD_ID = 0
NONE_ID = 257
TEXT_VOCAB = 258


_WORD = re.compile(r"[^\s.,;:!?\"']+")


class UnknownWordsWarning(UserWarning):
    """A prompt holds words the model never saw in training."""


def normalize_text(text: str) -> str:
    """Lower case, runs of whitespace as one space, no leading/trailing space."""
    return " ".join(text.lower().split())


def words(text: str) -> List[str]:
    """The words of a (normalised) text, punctuation dropped."""
    return _WORD.findall(normalize_text(text))


def unknown_words(text: str, vocabulary: Iterable[str]) -> List[str]:
    """Words of ``text`` not in ``vocabulary``, in order, each once."""
    vocab = set(vocabulary)
    out = []
    for w in words(text):
        if w not in vocab and w not in out:
            out.append(w)
    return out


def vocabulary_of(texts: Iterable[str]) -> Tuple[str, ...]:
    """The sorted set of words of some captions (a training set's vocabulary)."""
    return tuple(sorted({w for t in texts for w in words(t)}))


class ByteTextTokenizer:
    def __init__(self, max_len: int = 32):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len=}")
        self.max_len = max_len
        self.vocab_size = TEXT_VOCAB

    def encode(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """A list of strings (or one string, a batch of one) -> (B, max_len) long, zero-padded."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"text must be a str or a list of str, got {type(texts).__name__}")
        out = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text[{i}] must be a str, got {type(t).__name__}: {t!r}")
            b = t.encode("utf-8")
            if len(b) > self.max_len:
                warnings.warn(f"text[{i}] is {len(b)} bytes, longer than max_len={self.max_len}; "
                              f"truncated: {t!r}", UserWarning, stacklevel=2)
                b = b[:self.max_len]
            if b:
                out[i, :len(b)] = torch.tensor(list(b), dtype=torch.long) + 1
        return out

    def decode(self, tokens: torch.Tensor) -> List[str]:
        """(B, L) ids -> strings; padding and NONE ids are skipped."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a (B, L) tensor, got {tokens!r:.80}")
        res = []
        for row in tokens.tolist():
            res.append(bytes(i - 1 for i in row if 1 <= i <= 256).decode("utf-8", errors="ignore"))
        return res
