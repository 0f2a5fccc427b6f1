"""Tokenizer: the sentencepiece model Mistral ships as tokenizer.model, where to find it in a
checkpoint directory, and decoding a token stream piece by piece."""

from __future__ import annotations

import os

import sentencepiece

# The names a checkpoint directory gives its sentencepiece model, in order of preference.
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v2", "tokenizer.model.v1")


def find_tokenizer(path: str) -> str | None:
    """The sentencepiece model of a checkpoint directory, under any of its usual names."""
    for name in TOKENIZER_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


class Tokenizer:
    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer {path} not found")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text; BOS first by default, as Mistral models were trained."""
        return [self.bos_id] * bos + self._sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(list(ids))


class StreamDecoder:
    """Text of a token stream, piece by piece, each call decoding only the tokens since the
    last piece and the one piece before (the context sentencepiece needs to place a word's
    leading space). A character whose bytes are split across pieces decodes as U+FFFD until
    its last byte arrives, so such a piece is held back until it settles. Joined, the pieces
    are tokenizer.decode(all tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._context = 0  # start of the piece before the unread tokens
        self._read = 0  # tokens already turned into text

    def push(self, tokens: list[int]) -> str:
        """The new text that tokens settle (possibly "")."""
        self._tokens.extend(tokens)
        decode = self._tokenizer.decode
        text = decode(self._tokens[self._context:])
        if text.endswith("\ufffd"):
            return ""
        new = text[len(decode(self._tokens[self._context:self._read])):]
        self._context, self._read = self._read, len(self._tokens)
        return new

    def flush(self) -> str:
        """Whatever is held back, as it decodes now (at the end of the stream)."""
        decode = self._tokenizer.decode
        new = decode(self._tokens[self._context:])[len(decode(self._tokens[self._context:self._read])):]
        self._context = self._read = len(self._tokens)
        return new
