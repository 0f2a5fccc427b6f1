"""Tokenizer: every tokenizer a Mistral checkpoint ships (sentencepiece `tokenizer.model` /
`tokenizer.model.v1` ... `v7`, Tekken `tekken.json`) and the one train.py trains; the chat
format each Mistral release was trained on (with chat.py); finding the file in a checkpoint
directory.

Tekken and every chat format are mistral-common's own code (Mistral's tokenizer library);
sentencepiece files are read by sentencepiece itself, which gives mistral-common's ids.
"""

from __future__ import annotations

import copy
import filecmp
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mistral_common
import numpy as np
import pydantic
import sentencepiece
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, FinetuningAssistantMessage
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken

from mistral_jax.text.chat import Reply, ReplyReader, has_images, unicode_text, with_image_urls
from mistral_jax.text.chat import request as chat_request

# The names a checkpoint directory gives its tokenizer, in order of preference: the versioned
# ones say which chat format the model was trained on; a bare tokenizer.model does not.
TOKENIZER_NAMES = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2",
                   "tokenizer.model.v1", "tokenizer.model")
_BUNDLED = Path(mistral_common.__file__).parent / "data"  # mistral-common's copies of the released files


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
            self._control = functools.partial(_tekken_special, tekken)
        else:
            sp = sentencepiece.SentencePieceProcessor()
            try:
                sp.Load(path)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path} is neither a sentencepiece model nor a Tekken tokenizer: {e}") from None
            self.vocab_size, self.bos_id, self.eos_id = sp.GetPieceSize(), sp.bos_id(), sp.eos_id()
            self._encode = sp.EncodeAsIds
            self._decode = lambda ids: sp.DecodeIds(list(ids))  # control tokens dropped
            self._control = functools.partial(_sentencepiece_control, sp)
        self._chat: MistralTokenizer | None = None
        self._finetuning: MistralTokenizer | None = None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text; BOS first by default, as Mistral models were trained."""
        return [self.bos_id] * bos + self._encode(unicode_text(text)) + [self.eos_id] * eos

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

    def encode_chat(self, messages: Iterable[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                    reasoning_effort: str | None = None) -> list[int]:
        """Token ids of a conversation for the model to answer, as this tokenizer's Mistral
        release encodes it (mistral-common's encode_chat_completion): [INST] ... [/INST] as
        control tokens from v2 on and as text in v1, the system prompt where each version puts
        it, tools, tool calls and results, thinking (v13 on), reasoning_effort (v15).

        Args:
          messages: OpenAI's chat format: {"role": "system" | "user" | "assistant" | "tool",
            "content": str or a list of parts}; an assistant's "tool_calls"
            [{"id", "type": "function", "function": {"name", "arguments"}}] and thinking as
            mistral-common's chunk {"type": "thinking", "thinking": ...} in its content list; a
            tool result's "tool_call_id". It ends with a user turn or tool results.
          tools: OpenAI's tool definitions [{"type": "function", "function": {"name",
            "description", "parameters"}}], or None.
          reasoning_effort: "none" ... "high" where the tokenizer's settings allow it (v15).
        """
        messages = list(messages)
        if has_images(messages):
            raise ValueError("the conversation has images: encode it with encode_multimodal_chat, which "
                             "returns the images with the ids")
        return self._encode_request(messages, tools, reasoning_effort).tokens

    def encode_multimodal_chat(self, messages: Iterable[Mapping[str, Any]],
                               tools: Sequence[Mapping[str, Any]] | None = None,
                               reasoning_effort: str | None = None) -> tuple[list[int], list[np.ndarray]]:
        """(ids, images) of a conversation with images, as mistral-common encodes it: ids with
        each image's [IMG] tokens row by row ([IMG_BREAK] after each row, [IMG_END] last), and
        the images resized (the longest side at most the tokenizer's max_image_size, each side a
        multiple of its patch_size x spatial_merge_size) and normalised, float32 [3, H, W], in
        order: what `Mistral.apply(..., images=images)` and `generate(..., images=[images])` take.

        Args:
          messages: as encode_chat, a message's content a list of parts among which images:
            {"type": "image_url", "image_url": {"url": a file path, file:// URL or data URL}}, or
            {"type": "image", "image": a PIL image or a uint8 array [H, W(, 3 or 4)]}. Nothing is
            downloaded: a web URL is refused.
          tools, reasoning_effort: as encode_chat.
        """
        chat = self._chat_or_say_why()
        if chat.instruct_tokenizer.image_encoder is None:
            raise ValueError(f"{self.path} has no image settings: it is the tokenizer of a model without "
                             "vision (a vision model's tekken.json holds an \"image\" section)")
        encoded = self._encode_request(with_image_urls(messages), tools, reasoning_effort)
        return encoded.tokens, [np.asarray(image, np.float32) for image in encoded.images]

    def encode_chat_for_training(self, messages: Iterable[Mapping[str, Any]],
                                 tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation to train on: ids as mistral-common encodes it in
        its fine-tuning mode (ValidationMode.finetuning: the conversation ends with an assistant
        turn, kept with its eos, so encode_chat of the conversation before that turn is a prefix
        of ids); mask 1 on each assistant turn's tokens (its content, tool calls and closing eos)
        and 0 on the rest (the start, system prompt, user turns, tool results), and 0 on a turn
        whose message has "weight": 0 (mistral-finetune's field; 1 or absent trains it).

        messages and tools as encode_chat; images are refused (the vision tower is not trained).
        """
        messages = list(messages)
        if has_images(messages):
            raise ValueError("the conversation has images: training on images is not supported")
        self._chat_or_say_why()
        if self._finetuning is None:
            self._finetuning = MistralTokenizer.from_file(self._chat_file(), mode=ValidationMode.finetuning)
        weights = [m.get("weight") if isinstance(m, Mapping) else None for m in messages]
        plain = [{k: v for k, v in m.items() if k != "weight"} if isinstance(m, Mapping) else m for m in messages]
        # The encoder of each message, recorded on a private copy (the shared one is left as it is).
        pieces: list[tuple[Any, list[int]]] = []
        chat = copy.copy(self._finetuning)
        chat.instruct_tokenizer = copy.copy(chat.instruct_tokenizer)
        for name in _MESSAGE_ENCODERS:
            setattr(chat.instruct_tokenizer, name, _recorder(getattr(chat.instruct_tokenizer, name), pieces))
        encoded = self._encode_request(plain, tools, None, chat=chat, weights=weights)
        ids, start = encoded.tokens, len(encoded.tokens) - sum(len(tokens) for _, tokens in pieces)
        if start < 0 or ids[start:] != [t for _, tokens in pieces for t in tokens]:
            raise RuntimeError("mistral-common's encoding is not its messages' encodings in order: this version "
                               f"({mistral_common.__version__}) encodes conversations differently than expected")
        turns = iter(_turn_weights(messages, weights))
        mask = [0] * start
        for message, tokens in pieces:
            trained = isinstance(message, AssistantMessage) and next(turns) != 0
            mask += [int(trained)] * len(tokens)
        return ids, mask

    def _encode_request(self, messages, tools, reasoning_effort, chat: MistralTokenizer | None = None,
                        weights: list | None = None):
        chat = chat or self._chat_or_say_why()
        try:
            request = chat_request(messages, tools, reasoning_effort)
            if weights is not None:  # fine-tuning: each assistant message's weight
                request.messages = [_weighted(m, w) for m, w in zip(request.messages, weights, strict=True)]
            try:
                return chat.encode_chat_completion(request)
            except (ValueError, OSError) as e:  # an image that does not decode, a file that does not read
                raise MistralCommonException(str(e)) from None
        except (MistralCommonException, pydantic.ValidationError, AssertionError, KeyError, TypeError,
                AttributeError) as e:  # what mistral-common raises on a message it cannot read
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"not a conversation the chat format accepts: {first}") from None

    def parse_reply(self, tokens: Sequence[int]) -> Reply:
        """A generated reply (eos excluded) as data: its thinking, its answer and its tool calls."""
        return self.reply_reader().parse(list(tokens))

    def reply_reader(self) -> ReplyReader:
        """What splits replies by this tokenizer's control tokens (text/chat.py)."""
        chat = self._chat_or_say_why()
        raw = chat.instruct_tokenizer.tokenizer
        return ReplyReader(self.control_id, lambda ids: raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE),
                           calls_are_lists=raw.version <= TokenizerVersion.v7)

    def control_id(self, name: str) -> int | None:
        """The id of a control token ("[INST]", "[THINK]", ...) in this file, or None."""
        return self._control(name)

    def _chat_or_say_why(self) -> MistralTokenizer:
        chat = self._chat_tokenizer()
        if chat is None:
            raise ValueError(f"{self.path} has no chat format: it is no Mistral instruct tokenizer that "
                             "mistral-common knows (a tokenizer train.py trained has no [INST] tokens); "
                             "an instruct checkpoint's file is named tokenizer.model.v1/v3/v7 or tekken.json")
        return chat

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


# What mistral-common's encode_instruct calls once per (normalised) message, in order.
_MESSAGE_ENCODERS = ("encode_system_message", "encode_user_message", "encode_tool_message", "encode_assistant_message")


def _recorder(encode, pieces: list):
    """encode, which also appends (message, its tokens) to pieces."""
    def recorded(*args, **kwargs):
        out = encode(*args, **kwargs)
        tokens = out[0] if isinstance(out, tuple) else out
        pieces.append((kwargs["message"] if "message" in kwargs else args[0], list(tokens or [])))
        return out
    return recorded


def _turn_weights(messages: list, weights: list) -> list:
    """The weight of each assistant turn mistral-common encodes: it joins neighbouring assistant
    messages of one weight into one turn (and keeps the weight out of the joined message)."""
    turns, previous = [], None
    for message, weight in zip(messages, weights):
        role = message.get("role")
        if role == "assistant" and (previous != "assistant" or weight != turns[-1]):
            turns.append(weight)
        previous = role
    return turns


def _weighted(message, weight):
    if weight is None or not isinstance(message, AssistantMessage):
        return message
    return FinetuningAssistantMessage(**dict(message), weight=weight)


def _tekken_special(tekken: Tekkenizer, name: str) -> int | None:
    try:
        return tekken.get_special_token(name)
    except ValueError:  # not in this file
        return None


def _sentencepiece_control(sp: sentencepiece.SentencePieceProcessor, name: str) -> int | None:
    token = sp.PieceToId(name)
    return token if sp.IsControl(token) and sp.IdToPiece(token) == name else None
