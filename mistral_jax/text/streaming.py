"""Decoding as tokens come: text piece by piece (StreamDecoder), a chat reply's thinking apart
from its answer (ReplyStream), and a reply as a terminal shows it (PrintedReply)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from mistral_jax.text.chat import END_THINK, THINK, TOOL_CALLS, ReplyReader
from mistral_jax.text.tokenizer import Tokenizer


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


class ReplyStream:
    """A reply's text piece by piece as tokens come, each piece ("thinking" | "content", text);
    tool calls are not streamed (parse the whole reply for them)."""

    def __init__(self, reader: ReplyReader, stream_decoder):
        self._reader, self._decoder = reader, stream_decoder
        self._kind, self._calling = "content", False
        self._ids = reader.ids

    def push(self, tokens: Iterable[int]) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        run: list[int] = []
        for token in tokens:
            if token in (self._ids[THINK], self._ids[END_THINK], self._ids[TOOL_CALLS]):
                pieces.append((self._kind, self._decoder.push(run) + self._decoder.flush()))
                run = []
                self._kind = "thinking" if token == self._ids[THINK] else "content"
                self._calling = self._calling or token == self._ids[TOOL_CALLS]
            elif not self._calling:
                run.append(token)
        if run:
            pieces.append((self._kind, self._decoder.push(run)))
        return [(kind, text) for kind, text in pieces if text]

    def flush(self) -> list[tuple[str, str]]:
        text = self._decoder.flush()
        return [(self._kind, text)] if text else []


class PrintedReply:
    """A chat reply as a terminal shows it, piece by piece: its thinking between a
    "--- thinking ---" line and an "--- answer ---" line, the answer, then a line per tool
    call, `tool call: name({"argument": ...})`. Whatever way the tokens come, the pieces join
    to the same text."""

    THINKING, ANSWER = "--- thinking ---\n", "\n--- answer ---\n"

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer, self._tokens = tokenizer, []
        self._stream = ReplyStream(tokenizer.reply_reader(), StreamDecoder(tokenizer))
        self._kind, self._printed = "content", False

    def push(self, tokens: Iterable[int]) -> str:
        tokens = list(tokens)
        self._tokens += tokens
        return self._render(self._stream.push(tokens))

    def flush(self) -> str:
        text = self._render(self._stream.flush())
        if self._kind == "thinking":  # the reply ended while thinking
            text += self.ANSWER
        try:
            calls = [f"tool call: {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})"
                     for c in self._tokenizer.parse_reply(self._tokens).tool_calls]
        except ValueError as e:  # the model wrote a malformed call: show it, do not fail
            calls = [f"tool call not understood: {e}"]
        lines = "\n".join(calls)
        return text + ("\n" if lines and (self._printed or text) else "") + lines

    def _render(self, pieces: list[tuple[str, str]]) -> str:
        out = []
        for kind, text in pieces:
            if kind != self._kind:
                out.append(self.THINKING if kind == "thinking" else self.ANSWER)
                self._kind = kind
            out.append(text)
        self._printed = self._printed or any(out)
        return "".join(out)
