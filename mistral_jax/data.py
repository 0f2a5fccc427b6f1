"""Text corpus -> token batches: files or the built-in corpus, a sentencepiece model trained
on first use, a cached token memmap, a train/validation split, deterministic batches.

A batch is a pure function of (seed, step): the data position saved with a checkpoint is
the step itself, and each host computes only its own rows of the global batch.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator

import numpy as np
import sentencepiece

from mistral_jax.tokenizer import Tokenizer

BUILTIN = "builtin"  # the text of Python's bundled documentation: English every install has
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")


def builtin_documents() -> list[str]:
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def find_files(patterns: list[str]) -> list[str]:
    """Files named by paths, globs or directories (searched recursively for text files)."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            for root, _, names in sorted(os.walk(pattern)):
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES)]
        else:
            files += sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.isfile(pattern) else [])
    if not files:
        raise ValueError(f"no data files matched {' '.join(patterns)}")
    return files


def read_documents(files: list[str]) -> Iterator[str]:
    """Each file is a document; each line of a .jsonl file is one, its "text" field."""
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            if not file.endswith(".jsonl"):
                yield f.read()
                continue
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{file}:{number} is not a JSON object with a \"text\" field") from None
                yield text


def documents(data: list[str]) -> Iterator[str]:
    return iter(builtin_documents()) if data == [BUILTIN] else read_documents(find_files(data))


def corpus_fingerprint(data: list[str]) -> str:
    """Identifies the corpus: the files' paths, sizes and modification times (or the builtin)."""
    if data == [BUILTIN]:
        return f"builtin-python-{sys.version_info.major}.{sys.version_info.minor}"
    return json.dumps([(f, os.path.getsize(f), os.path.getmtime(f)) for f in find_files(data)])


def train_tokenizer(data: list[str], path: str, vocab_size: int) -> Tokenizer:
    """A byte-fallback BPE sentencepiece model with Mistral's special ids (unk 0, bos 1, eos 2)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=documents(data), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 24,
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=os.cpu_count(),
        minloglevel=2)
    _write_atomically(path, model.getvalue())
    return Tokenizer(path)


def tokenize(data: list[str], tokenizer_path: str, cache_dir: str) -> np.ndarray:
    """Every document as [BOS] + tokens + [EOS], concatenated into a cached uint16/uint32 memmap
    keyed by the tokenizer's bytes and the corpus fingerprint."""
    tokenizer = Tokenizer(tokenizer_path)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    with open(tokenizer_path, "rb") as f:
        key = hashlib.sha256(f.read() + corpus_fingerprint(data).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokens-{key}.{np.dtype(dtype).name}")
    if not os.path.exists(path):
        chunks = [np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype) for text in documents(data)]
        os.makedirs(cache_dir, exist_ok=True)
        _write_atomically(path, np.concatenate(chunks).tobytes() if chunks else b"")
    if os.path.getsize(path) == 0:
        raise ValueError(f"the corpus {' '.join(data)} holds no text")
    return np.memmap(path, dtype=dtype, mode="r")


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class TokenBatches:
    """Windows of seq_len + 1 tokens from a token array, split into train and validation.

    Train windows are non-overlapping, visited in a fresh permutation each epoch (seeded);
    batch(step) is deterministic, so resuming at a step resumes the data exactly.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int = 0,
                 val_fraction: float = 0.05):
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        split = int(len(tokens) * (1 - val_fraction))
        self.train, self.val = tokens[:split], tokens[split:]
        self.n_windows = (len(self.train) - 1) // seq_len
        if self.n_windows < global_batch or (len(self.val) - 1) // seq_len < 1:
            raise ValueError(f"the corpus has {len(tokens)} tokens: too short for a batch of {global_batch} x "
                             f"{seq_len + 1} tokens plus a validation split of {val_fraction:.0%}")
        self._epoch, self._order = -1, None

    def _window(self, index: int) -> np.ndarray:
        epoch, i = divmod(index, self.n_windows)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        start = int(self._order[i]) * self.seq_len
        return self.train[start:start + self.seq_len + 1]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """This process's rows [global_batch / process_count, seq_len + 1] of the batch of step."""
        rows = self.global_batch // process_count
        first = step * self.global_batch + process_index * rows
        return np.stack([self._window(first + r) for r in range(rows)]).astype(np.int32)

    def validation(self, max_batches: int, process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
        """Fixed validation batches (the same every evaluation), this process's rows."""
        n = (len(self.val) - 1) // self.seq_len
        windows = [self.val[i * self.seq_len:(i + 1) * self.seq_len + 1] for i in range(n)]
        rows = self.global_batch // process_count
        for b in range(min(max_batches, max(1, n // self.global_batch))):
            chosen = [windows[(b * self.global_batch + process_index * rows + r) % n] for r in range(rows)]
            yield np.stack(chosen).astype(np.int32)
