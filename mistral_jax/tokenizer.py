"""Tokenizer: the sentencepiece model Mistral ships as tokenizer.model."""

from __future__ import annotations

import os

import sentencepiece


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
