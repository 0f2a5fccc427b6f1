"""Tokenizer: every tokenizer a Mistral checkpoint ships (sentencepiece `tokenizer.model` /
`tokenizer.model.v1` ... `v7`, Tekken `tekken.json`) and the one train.py trains; the chat
format each Mistral release was trained on; finding the file in a checkpoint directory;
decoding a token stream piece by piece.

Tekken and every chat format are mistral-common's own code (Mistral's tokenizer library);
sentencepiece files are read by sentencepiece itself, which gives mistral-common's ids.
"""

from __future__ import annotations

import filecmp
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import mistral_common
import sentencepiece
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken

# The names a checkpoint directory gives its tokenizer, in order of preference: the versioned
# ones say which chat format the model was trained on; a bare tokenizer.model does not.
TOKENIZER_NAMES = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2",
                   "tokenizer.model.v1", "tokenizer.model")
_BUNDLED = Path(mistral_common.__file__).parent / "data"  # mistral-common's copies of the released files
_MESSAGES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def _unicode(text: str) -> str:
    """text, refused with a clear error where it cannot be UTF-8: a lone surrogate (what
    Python makes of invalid bytes in argv), which the encoders reject in their own words."""
    if not isinstance(text, str):
        raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}") \
            from None
    return text


def checkpoint_name(path: str) -> str:
    """The name a checkpoint directory gives this tokenizer file (one of TOKENIZER_NAMES), which
    keeps the version its release's name says: tekken.json, tokenizer.model.v3, ...."""
    if is_tekken(path):
        return "tekken.json"
    versioned = f"tokenizer.model.{path.rsplit('.', 1)[-1]}"
    return versioned if versioned in TOKENIZER_NAMES else "tokenizer.model"


def find_tokenizer(path: str) -> str | None:
    """The tokenizer file of a checkpoint directory, under any of its usual names."""
    for name in TOKENIZER_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


class Tokenizer:
    """A tokenizer file: `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, and the chat
    format of an instruct model (`encode_chat`)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer {path} not found")
        self.path = path
        if is_tekken(path):
            try:
                tekken = Tekkenizer.from_file(path)
            except (MistralCommonException, ValueError, KeyError) as e:
                raise ValueError(f"{path} is not a Tekken tokenizer: {e}") from None
            self.vocab_size, self.bos_id, self.eos_id = tekken.n_words, tekken.bos_id, tekken.eos_id
            self._encode = lambda text: tekken.encode(text, bos=False, eos=False)
            self._decode = tekken.decode  # special tokens (ids below num_special_tokens) dropped
        else:
            sp = sentencepiece.SentencePieceProcessor()
            try:
                sp.Load(path)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path} is neither a sentencepiece model nor a Tekken tokenizer: {e}") from None
            self.vocab_size, self.bos_id, self.eos_id = sp.GetPieceSize(), sp.bos_id(), sp.eos_id()
            self._encode = sp.EncodeAsIds
            self._decode = lambda ids: sp.DecodeIds(list(ids))  # control tokens dropped
        self._chat: MistralTokenizer | None = None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text; BOS first by default, as Mistral models were trained."""
        return [self.bos_id] * bos + self._encode(_unicode(text)) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode(list(ids))

    def _chat_file(self) -> str | None:
        """The file mistral-common reads this tokenizer's chat format from: the file itself
        when its name says its version (tekken*.json, tokenizer.model.v3, ...), the bundled
        release it is byte for byte (a bare tokenizer.model), else None: no known chat format."""
        if is_tekken(self.path) or (is_sentencepiece(self.path) and not self.path.endswith(".model")):
            return self.path
        for bundled in sorted(_BUNDLED.iterdir()):
            if is_sentencepiece(bundled) and filecmp.cmp(self.path, bundled, shallow=False):
                return str(bundled)
        return None

    def encode_chat(self, messages: Iterable[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation [{"role": "system" | "user" | "assistant", "content": ...}],
        ending with a user turn, as this tokenizer's Mistral release encodes it for the model to
        answer (mistral-common's encode_chat_completion): [INST] ... [/INST] as control tokens
        from v2 on and as text in v1, the system prompt placed as each version places it."""
        chat = self._chat_tokenizer()
        if chat is None:
            raise ValueError(f"{self.path} has no chat format: it is no Mistral instruct tokenizer that "
                             "mistral-common knows (a tokenizer train.py trained has no [INST] tokens); "
                             "an instruct checkpoint's file is named tokenizer.model.v1/v3/v7 or tekken.json")
        try:
            request = ChatCompletionRequest(messages=[_MESSAGES[m["role"]](content=_unicode(m["content"]))
                                                      for m in messages])
            return chat.encode_chat_completion(request).tokens
        except KeyError as e:
            raise ValueError(f"chat messages need a role of {sorted(_MESSAGES)} and a content; got {e}") from None
        except MistralCommonException as e:
            raise ValueError(f"not a conversation the chat format accepts: {e}") from None

    @property
    def chat_version(self) -> str | None:
        """The Mistral tokenizer version whose chat format encode_chat uses ("v1", "v3", ...),
        or None."""
        chat = self._chat_tokenizer()
        return None if chat is None else chat.instruct_tokenizer.tokenizer.version.value

    def _chat_tokenizer(self) -> MistralTokenizer | None:
        if self._chat is None and (file := self._chat_file()) is not None:
            self._chat = MistralTokenizer.from_file(file)
        return self._chat


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
