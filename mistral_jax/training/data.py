"""Text corpus -> token batches: files or the built-in corpus, a sentencepiece model trained
on first use (its vocabulary fitted to what the corpus supports), a cached token memmap, a
train/validation split, deterministic batches.

A batch is a pure function of (seed, step): the data position saved with a checkpoint is
the step itself, and each host computes only its own rows of the global batch.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np
import pydoc_data.topics
import sentencepiece

from mistral_jax.runtime.options import OptionError
from mistral_jax.text.tokenizer import Tokenizer

BUILTIN = "builtin"  # English every Python install has: its documentation and its library's docstrings
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".jsonl")
# Parts of the standard library left out of the built-in corpus: tests, and the codecs'
# generated docstrings (one boilerplate text per codec).
_NOT_CORPUS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}
_SHORTEST_DOCSTRING = 80  # characters; shorter ones are mostly "Return x." one-liners


@functools.cache
def builtin_documents() -> tuple[str, ...]:
    """Python's topic documentation (pydoc_data) and the docstrings of its standard library's
    modules, classes and functions, read from their source files without importing them: a
    fixed order, exact duplicates and one-liners left out."""
    documents = list(dict.fromkeys(pydoc_data.topics.topics.values()))  # two topics share a text
    seen = set(documents)
    for file in _stdlib_sources():
        for docstring in _docstrings(file):
            if len(docstring) >= _SHORTEST_DOCSTRING and docstring not in seen:
                seen.add(docstring)
                documents.append(docstring)
    return tuple(documents)


def _stdlib_sources() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _NOT_CORPUS)
        files += [os.path.join(directory, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _docstrings(file: str) -> list[str]:
    try:
        with open(file, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a file this Python cannot parse: not part of the corpus
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


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
                    raise ValueError(f"{file}:{number} is not a JSON object with a \"text\" field (nor \"messages\": "
                                     "a conversation; preference pairs train with --objective dpo)") from None
                yield text


def documents(data: list[str]) -> Iterator[str]:
    return iter(builtin_documents()) if data == [BUILTIN] else read_documents(find_files(data))


def corpus_fingerprint(data: list[str]) -> str:
    """Identifies the corpus: the files' paths, sizes and modification times (or the builtin)."""
    if data == [BUILTIN]:
        return f"builtin-docs-and-docstrings-python-{sys.version}"
    return json.dumps([(f, os.path.getsize(f), os.path.getmtime(f)) for f in find_files(data)])


# What sentencepiece says when the corpus cannot fill the vocabulary, or the vocabulary cannot
# hold the corpus's characters and the 256 byte pieces.
_TOO_MANY_PIECES = re.compile(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)")
_TOO_FEW_PIECES = re.compile(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)")


def train_tokenizer(data: list[str], path: str, vocab_size: int) -> Tokenizer:
    """A byte-fallback BPE sentencepiece model with Mistral's special ids (unk 0, bos 1, eos 2),
    of vocab_size pieces, or of the most the corpus supports if it cannot fill that many (the
    returned tokenizer's vocab_size says which)."""
    try:
        model = _train_sentencepiece(data, vocab_size)
    except RuntimeError as e:
        if fewer := _TOO_MANY_PIECES.search(str(e)):
            model = _train_sentencepiece(data, int(fewer[1]))
        elif more := _TOO_FEW_PIECES.search(str(e)):
            raise OptionError("vocab_size", f"{vocab_size} cannot hold the data's characters and the byte "
                                            f"pieces: it needs at least {more[1]}") from None
        else:
            raise
    _write_atomically(path, model)
    return Tokenizer(path)


def _train_sentencepiece(data: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=documents(data), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 24,
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=os.cpu_count(),
        minloglevel=2)
    return model.getvalue()


def tokenize(data: list[str], tokenizer: Tokenizer, cache_dir: str) -> np.ndarray:
    """Every document as [BOS] + tokens + [EOS], concatenated into a cached uint16/uint32 memmap
    keyed by the tokenizer file's bytes and the corpus fingerprint."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    with open(tokenizer.path, "rb") as f:
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
