"""Conversations and preference pairs -> training batches: JSONL lines encoded with the
checkpoint's own tokenizer into examples (ids, and which of them are trained); conversations
packed several to a row, each attending only to itself; preference pairs a row per answer.

An example of n tokens fills n - 1 positions of a row: inputs ids[:-1], targets ids[1:], the
loss mask of the targets, positions 0..n-2 (restarting per example) and one segment id per
example, which the attention kernels read (layers.Attention). An example is never split: it
goes into the first open row with room for it (pack), each row's unused tail is padding, out
of the loss. As data.TokenBatches, a batch is a pure function of (seed, step).

Lines (each file's line numbers are reported on a bad line):
  {"messages": [...], "tools": [...]}  a conversation; the assistant's tokens trained
                                       (Tokenizer.encode_chat_for_training; "weight": 0 skips a turn)
  {"text": "..."}                      text, every token trained
  {"prompt": ..., "chosen": ..., "rejected": ...}   a preference pair (DPO): the prompt a
      conversation or a string (one user turn), each answer a message, a list of messages or a
      string (the assistant's)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from mistral_jax.text.tokenizer import Tokenizer

LONG = ("truncate", "drop")  # what becomes of an example longer than a row
BAD_LINES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids and, per token, whether it is trained as a target (the first never is)."""

    ids: np.ndarray
    trained: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class BadLine(ValueError):
    """A line that is no example, said with its file and line number."""


def conversation_example(tokenizer: Tokenizer, line: Mapping) -> Example:
    """The example of one JSONL line: a conversation ("messages", "tools") or text ("text")."""
    if "messages" in line:
        ids, mask = tokenizer.encode_chat_for_training(_messages(line["messages"], "messages"), line.get("tools"))
        return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))
    if isinstance(line.get("text"), str):
        ids = tokenizer.encode(line["text"], bos=True, eos=True)
        return Example(np.asarray(ids, np.int32), np.ones(len(ids), bool))
    raise ValueError('is no example: it needs "messages" (a conversation) or "text"')


def preference_example(tokenizer: Tokenizer, line: Mapping) -> tuple[Example, Example]:
    """(chosen, rejected) of one preference line: each the prompt and its answer, only the
    answer's assistant tokens trained (the prompt's own assistant turns are context)."""
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in line]
    if missing:
        raise ValueError(f"is no preference pair: it has no {', '.join(map(repr, missing))}")
    prompt = line["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    context = [{**m, "weight": 0} if isinstance(m, Mapping) and m.get("role") == "assistant" else m for m in prompt]
    pair = []
    for key in ("chosen", "rejected"):
        answer = line[key]
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        elif isinstance(answer, Mapping):
            answer = [answer]
        answer = _messages(answer, key)
        if answer[-1].get("role") != "assistant":
            raise ValueError(f'"{key}" must end with an assistant message')
        ids, mask = tokenizer.encode_chat_for_training(context + answer, line.get("tools"))
        pair.append(Example(np.asarray(ids, np.int32), np.asarray(mask, bool)))
    return pair[0], pair[1]


def _messages(value, key: str) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(m, Mapping) for m in value):
        raise ValueError(f'"{key}" must be a non-empty list of messages')
    return value


def has_conversations(files: Sequence[str]) -> bool:
    """Whether a .jsonl file among files holds a conversation line ("messages")."""
    for file in files:
        if not file.endswith(".jsonl"):
            continue
        with open(file, encoding="utf-8", errors="replace") as f:
            for text in f:
                if '"messages"' in text:
                    try:
                        if "messages" in json.loads(text):
                            return True
                    except (ValueError, TypeError):
                        pass
    return False


def read_lines(files: Sequence[str], encode, on_bad: str = "stop") -> tuple[list, int]:
    """(encode(line) for every line of the JSONL files, lines skipped): a line that is not JSON
    or that encode refuses (ValueError) stops the reading with a BadLine naming its file and
    line, or with on_bad "skip" is counted and left out."""
    out, skipped = [], 0
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            for number, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                    if not isinstance(line, Mapping):
                        raise ValueError("is not a JSON object")
                    out.append(encode(line))
                except ValueError as e:
                    if on_bad == "stop":
                        why = "is not JSON" if isinstance(e, json.JSONDecodeError) else str(e)
                        raise BadLine(f"{file}:{number} {why} (--bad-lines skip leaves such lines out)") from None
                    skipped += 1
    return out, skipped


def fit(example: Example, length: int, long: str) -> Example | None:
    """The example in at most `length` tokens: cut at the end, or None when long is "drop"."""
    if len(example) <= length:
        return example
    return None if long == "drop" else Example(example.ids[:length], example.trained[:length])


OPEN_ROWS = 64  # the rows first fit still fills; older ones are closed


def pack(examples: Sequence[Example], seq_len: int, open_rows: int = OPEN_ROWS) -> list[list[Example]]:
    """Rows of examples, each filling at most seq_len positions (n - 1 per example of n
    tokens), by first fit: each example in order goes into the first of the last open_rows
    rows with room for it, else starts a row. Examples are never split; first fit leaves less
    padding than starting a row at the first one that does not fit (BENCHMARKS.md)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    first_open = 0
    for example in examples:
        n = len(example) - 1
        row = next((i for i in range(first_open, len(rows)) if room[i] >= n), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
            first_open = max(first_open, len(rows) - open_rows)
        rows[row].append(example)
        room[row] -= n
    return rows


def row_arrays(row: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """One packed row: inputs, targets, mask (1 on trained targets), positions and segments
    (int32 [seq_len] each; the padding its own segment, -1)."""
    arrays = {name: np.zeros(seq_len, np.int32) for name in ("inputs", "targets", "mask", "positions")}
    arrays["segments"] = np.full(seq_len, -1, np.int32)
    start = 0
    for segment, example in enumerate(row):
        n = len(example) - 1
        span = slice(start, start + n)
        arrays["inputs"][span], arrays["targets"][span] = example.ids[:-1], example.ids[1:]
        arrays["mask"][span], arrays["positions"][span] = example.trained[1:], np.arange(n)
        arrays["segments"][span] = segment
        start += n
    arrays["positions"][start:] = np.arange(seq_len - start)
    return arrays


def stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def pair_arrays(pair: tuple[Example, Example], seq_len: int) -> dict[str, np.ndarray]:
    """A preference pair's rows, each answer alone: the arrays of row_arrays, [2, seq_len] each."""
    chosen, rejected = (row_arrays([example], seq_len) for example in pair)
    return {name: np.stack([chosen[name], rejected[name]]) for name in chosen}


class Batches:
    """Batches [global_batch, ...] of rows of items (examples packed several to a row, or
    preference pairs one to a row), split into train and validation items (the last
    val_fraction of them, at least one).

    Each epoch visits the train items in a fresh seeded order; batch(step) is deterministic,
    so resuming at a step resumes the data exactly.

    Args:
      items: Examples (each at most seq_len + 1 tokens: fit), or (chosen, rejected) pairs.
      pairs: whether items are pairs.
    """

    def __init__(self, items: Sequence, seq_len: int, global_batch: int, seed: int = 0,
                 val_fraction: float = 0.05, pairs: bool = False):
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        if len(items) < 2:
            raise ValueError(f"the data has {len(items)} example(s): too few for a training and a validation split")
        split = len(items) - max(1, int(len(items) * val_fraction))
        self.train, self.val = list(items[:split]), list(items[split:])
        self._rows_of = (lambda items: list(items)) if pairs else (lambda items: pack(items, seq_len))
        self._arrays = pair_arrays if pairs else row_arrays
        self._counts: dict[int, int] = {}
        self._val_rows: list[dict[str, np.ndarray]] | None = None
        self._epoch, self._rows = -1, []
        rows = self._epoch_rows(0)
        filled = sum(len(e) - 1 for item in self.train for e in (item if pairs else (item,)))
        self.padding = 1 - filled / (len(rows) * seq_len * (2 if pairs else 1))  # the share an epoch leaves empty

    def _epoch_rows(self, epoch: int) -> list:
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            self._epoch, self._rows = epoch, self._rows_of([self.train[i] for i in order])
            self._counts[epoch] = len(self._rows)
        return self._rows

    def _row(self, index: int) -> dict[str, np.ndarray]:
        epoch = 0
        while index >= (count := self._counts.get(epoch) or len(self._epoch_rows(epoch))):
            index -= count  # epochs may pack into different numbers of rows
            epoch += 1
        return self._arrays(self._epoch_rows(epoch)[index], self.seq_len)

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows [global_batch / process_count, ...] of the batch of step."""
        rows = self.global_batch // process_count
        first = step * self.global_batch + process_index * rows
        return stack([self._row(first + r) for r in range(rows)])

    def validation(self, max_batches: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Fixed validation batches (the same every evaluation), this process's rows."""
        if self._val_rows is None:  # packed once: every evaluation reads the same rows
            self._val_rows = [self._arrays(row, self.seq_len) for row in self._rows_of(self.val)]
        rows_of_val, rows = self._val_rows, self.global_batch // process_count
        for b in range(min(max_batches, max(1, len(rows_of_val) // self.global_batch))):
            yield stack([rows_of_val[(b * self.global_batch + process_index * rows + r) % len(rows_of_val)]
                         for r in range(rows)])
