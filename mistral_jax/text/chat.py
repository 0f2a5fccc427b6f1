"""Conversations in OpenAI's chat format, as Mistral's instruct models read and write them.

In: messages and tools as dicts (system, user, assistant with content, `tool_calls` and
thinking chunks `{"type": "thinking", "thinking": ...}`, tool results with `tool_call_id`),
checked and turned into mistral-common's ChatCompletionRequest, whose encoding for each
release (v1 ... v15) is the oracle of every chat format.

Out: what a model generates after such a prompt, split by the control tokens the tokenizer
file defines (never hard-coded ids) into its thinking (`[THINK]` ... `[/THINK]`), its answer
and its tool calls: `[TOOL_CALLS]` followed by a JSON list of {name, arguments, id} (v2 to v7)
or by `name[ARGS]{arguments}` per call (v11 on; v11 may put `[CALL_ID]id` before `[ARGS]`).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

THINK, END_THINK, TOOL_CALLS, ARGS, CALL_ID = "[THINK]", "[/THINK]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
ROLES = ("system", "user", "assistant", "tool", "developer")


def unicode_text(text: str) -> str:
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


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        unicode_text(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _check_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_strings(item)


def request(messages: Iterable[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
            reasoning_effort: str | None = None) -> ChatCompletionRequest:
    """mistral-common's request of an OpenAI-format conversation; ValueError saying what is
    wrong with a message (no role of ROLES, text that is no Unicode)."""
    messages = list(messages)
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, Mapping) else message
            raise ValueError(f"chat messages need a role of {list(ROLES)} and a content; message {i} has {role!r}")
    _check_strings([messages, tools])
    extra = {} if reasoning_effort is None else {"reasoning_effort": reasoning_effort}
    return ChatCompletionRequest.from_openai([dict(m) for m in messages], tools=None if tools is None else
                                             [dict(t) for t in tools], **extra)


IMAGE_PARTS = ("image_url", "image")  # the content parts that carry an image


def has_images(messages: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a message's content holds an image part."""
    return any(isinstance(m, Mapping) and isinstance(m.get("content"), list) and any(
        isinstance(part, Mapping) and part.get("type") in IMAGE_PARTS for part in m["content"]) for m in messages)


def with_image_urls(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """messages with each image part made one mistral-common reads without a network: an
    {"type": "image_url", "image_url": {"url": URL}} (or "image_url": URL) whose URL is a file
    path, a file:// URL or a data URL, or an {"type": "image", "image": a PIL image or a uint8
    array [H, W] / [H, W, 3 or 4]}, becomes an image_url part of a file:// or data: URL.
    ValueError for a web URL (nothing is downloaded), a missing file or an unreadable array."""
    out = []
    for message in messages:
        message = dict(message) if isinstance(message, Mapping) else message
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            message["content"] = [_image_url_part(part) if isinstance(part, Mapping) and part.get("type") in
                                   IMAGE_PARTS else part for part in message["content"]]
        out.append(message)
    return out


def _image_url_part(part: Mapping[str, Any]) -> dict[str, Any]:
    if part["type"] == "image":
        return {"type": "image_url", "image_url": {"url": _data_url(part.get("image"))}}
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, Mapping) else url
    if not isinstance(url, str) or not url:
        raise ValueError(f"an image_url part needs a URL: a file path or a data URL, got {url!r}")
    if url.startswith("data:"):
        return {"type": "image_url", "image_url": {"url": url}}
    if url.startswith(("http://", "https://")):
        raise ValueError(f"image {url[:80]!r}: images are not downloaded; give a file path or a data URL")
    path = url.removeprefix("file://")
    if not os.path.isfile(path):
        raise ValueError(f"image file {path} not found")
    return {"type": "image_url", "image_url": {"url": "file://" + os.path.abspath(path)}}


_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")  # what PNG stores as it is


def _data_url(image: Any) -> str:
    """A PIL image or a uint8 array [H, W] / [H, W, 3 or 4] as a PNG data URL (lossless)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"an image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], got {image.dtype} "
                             f"{list(image.shape)}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"an image part's image must be a PIL image or a uint8 array, got {type(image).__name__}")
    if image.mode not in _PNG_MODES:  # mistral-common converts such modes to RGBA first too
        image = image.convert("RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclasses.dataclass
class Reply:
    """What the model wrote: its thinking, its answer, and the tool calls it asked for, each
    {"name": ..., "arguments": {...}} with "id" where the format carries one."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class ReplyReader:
    """Splits a reply's tokens by the control tokens of a tokenizer: `control(name)` gives a
    control token's id or None, `decode(ids)` the text of ordinary tokens."""

    def __init__(self, control: Callable[[str], int | None], decode: Callable[[list[int]], str],
                 calls_are_lists: bool):
        self.ids = {name: control(name) for name in (THINK, END_THINK, TOOL_CALLS, ARGS, CALL_ID)}
        self.decode = decode
        self.calls_are_lists = calls_are_lists  # v2 to v7: [TOOL_CALLS] then a JSON list

    def parse(self, tokens: Sequence[int]) -> Reply:
        """The reply of generated tokens (eos excluded). A tool call that is no valid JSON is
        a ValueError saying so."""
        reply, content, thinking = Reply(), [], []
        calls: list[list[int]] = []
        where = content
        for token in tokens:
            if token == self.ids[THINK]:
                where = thinking
            elif token == self.ids[END_THINK]:
                where = content
            elif token == self.ids[TOOL_CALLS]:
                calls.append([])
                where = calls[-1]
            else:
                where.append(token)
        reply.content, reply.thinking = self.decode(content), self.decode(thinking)
        for call in calls:
            reply.tool_calls += self._calls(call)
        return reply

    def _calls(self, tokens: list[int]) -> list[dict[str, Any]]:
        if self.calls_are_lists:
            text = self.decode(tokens)
            try:
                calls = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"the model's tool calls are not a JSON list: {text[:200]!r}") from None
            if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
                raise ValueError(f"the model's tool calls are not a list of calls with names: {text[:200]!r}")
            return [{"name": c["name"], "arguments": c.get("arguments", {}), **({"id": c["id"]} if "id" in c else {})}
                    for c in calls]
        if self.ids[ARGS] not in tokens:
            raise ValueError(f"the model's tool call {self.decode(tokens)[:200]!r} has no {ARGS}")
        split = tokens.index(self.ids[ARGS])
        head, arguments = tokens[:split], self.decode(tokens[split + 1:])
        call_id = None
        if self.ids[CALL_ID] in head:
            cut = head.index(self.ids[CALL_ID])
            head, call_id = head[:cut], self.decode(head[cut + 1:])
        try:
            call = {"name": self.decode(head), "arguments": json.loads(arguments)}
        except json.JSONDecodeError:
            raise ValueError(f"the model's tool call arguments are not JSON: {arguments[:200]!r}") from None
        return [{**call, "id": call_id} if call_id is not None else call]
