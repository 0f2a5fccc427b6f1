"""OpenAI's HTTP API as data: request bodies checked and turned into what to generate, the text
of a reply as tokens come (stop strings, thinking, tool calls), and the JSON of responses,
stream chunks and errors (https://platform.openai.com/docs/api-reference)."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

from mistral_jax.inference.sampling import Sampler
from mistral_jax.runtime.options import OptionError
from mistral_jax.text.chat import has_images
from mistral_jax.text.streaming import ReplyStream, StreamDecoder
from mistral_jax.text.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # as OpenAI allows
# Fields whose only supported value is the default; anything else is refused, not ignored.
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "suffix": None,
               "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}


class ApiError(Exception):
    """An error response: its HTTP status and OpenAI's error object."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Job:
    """One request, checked: the prompt's ids and how to continue them."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    chat: bool
    images: tuple = ()  # float32 [C, H, W] each, filling the prompt's image tokens (a vision model's)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def check_model(body: Mapping, name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a string naming the model", "model")
    if model != name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{name}`", "model",
                       "model_not_found")


def completion_job(body: Mapping, tokenizer: Tokenizer, max_len: int) -> Job:
    """A /v1/completions body: prompt a string (encoded with BOS) or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt, bos=True)
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from None
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "one prompt per request: send a batch as concurrent requests", "prompt")
    else:
        raise ApiError(400, "'prompt' must be a non-empty string or list of token ids", "prompt")
    return _job(body, ids, max_len, tokenizer.vocab_size, chat=False)


def chat_job(body: Mapping, tokenizer: Tokenizer, max_len: int, vision: bool = False) -> Job:
    """A /v1/chat/completions body: messages (and tools, reasoning_effort) in the chat format of
    the tokenizer (Tokenizer.encode_chat); with image parts, for a vision model (`vision`), its
    images too (Tokenizer.encode_multimodal_chat: files of the server's, data URLs; nothing
    is downloaded)."""
    messages, tools = body.get("messages"), body.get("tools")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError(400, "'tools' must be a list of tool definitions", "tools")
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise ApiError(400, "'reasoning_effort' must be a string", "reasoning_effort")
    images, with_images = [], has_images(messages)
    if with_images and not vision:
        raise ApiError(400, "this model takes no images (it has no vision encoder)", "messages")
    try:
        if with_images:
            ids, images = tokenizer.encode_multimodal_chat(messages, tools=tools or None, reasoning_effort=effort)
        else:
            ids = tokenizer.encode_chat(messages, tools=tools or None, reasoning_effort=effort)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e).strip().splitlines()[0], "messages") from None
    return dataclasses.replace(_job(body, ids, max_len, tokenizer.vocab_size, chat=True), images=tuple(images))


def _job(body: Mapping, prompt: list[int], max_len: int, vocab_size: int, chat: bool) -> Job:
    for field, default in UNSUPPORTED.items():
        value = body.get(field)
        if value is not None and value != default and not (default is None and not value):  # {} and false pass
            raise ApiError(400, f"'{field}' is not supported (only {json.dumps(default)})", field)
    if len(prompt) >= max_len:
        raise ApiError(413, f"the prompt has {len(prompt)} tokens; this server's context is {max_len} tokens, "
                            "prompt and answer together", "messages" if chat else "prompt", "context_length_exceeded")
    max_tokens = _field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                        _is_int, "a positive integer", lambda v: v >= 1)
    if max_tokens is None:
        max_tokens = max_len - len(prompt)
    elif len(prompt) + max_tokens > max_len:
        raise ApiError(400, f"the prompt's {len(prompt)} tokens and max_tokens {max_tokens} are more than this "
                            f"server's context of {max_len} tokens", "max_tokens", "context_length_exceeded")
    temperature = _field(body, "temperature", _is_number, "a number in [0, 2]", lambda v: 0 <= v <= 2)
    top_p = _field(body, "top_p", _is_number, "a number in (0, 1]", lambda v: 0 < v <= 1)
    top_k = _field(body, "top_k", _is_int, f"an integer in [1, {vocab_size}] (or -1: off)",
                   lambda v: 1 <= v <= vocab_size or v == -1)
    seed = _field(body, "seed", _is_int, "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "true or false") or False
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                       "stop")
    try:  # OpenAI's defaults: temperature 1, top_p 1 (every token)
        sampler = Sampler(1.0 if temperature is None else temperature, None if top_k in (None, -1) else top_k,
                          None if top_p in (None, 1) else top_p)
    except OptionError as e:
        raise ApiError(400, f"'{e.field}' {e.problem}", e.field) from None
    return Job(prompt=prompt, max_tokens=max_tokens, sampler=sampler,
               seed=secrets.randbelow(2**63) if seed is None else seed, stop=tuple(stop), stream=stream,
               include_usage=bool(options and options.get("include_usage")), chat=chat)


def _field(body: Mapping, name: str, kind, says: str, valid=lambda v: True):
    value = body.get(name)
    if value is not None and not (kind(value) and valid(value)):
        raise ApiError(400, f"'{name}' must be {says}, got {json.dumps(value)}", name)
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class ReplyText:
    """A reply's text as its tokens come: push(tokens) gives the new pieces, each ("content" |
    "thinking", text), holding back any text that may begin a stop string; `stopped` once a
    stop string appears in the answer (its text and what follows are dropped). In a chat, the
    thinking is apart and tool calls are read from the whole reply at the end (`tool_calls`)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], chat: bool):
        self._tokenizer, self._stop, self._chat = tokenizer, stop, chat
        decoder = StreamDecoder(tokenizer)
        self._stream = ReplyStream(tokenizer.reply_reader(), decoder) if chat else None
        self._decoder = decoder
        self._held = ""  # answer text that may be the start of a stop string
        self.tokens: list[int] = []
        self.stopped = False

    def push(self, tokens: list[int]) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        self.tokens += tokens
        pieces = self._stream.push(tokens) if self._chat else [("content", self._decoder.push(tokens))]
        return self._cut(pieces, final=False)

    def flush(self) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        pieces = self._stream.flush() if self._chat else [("content", self._decoder.flush())]
        return self._cut(pieces, final=True)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The tool calls of the whole reply in OpenAI's form (none for a malformed one)."""
        if not self._chat or self.stopped:
            return []
        try:
            calls = self._tokenizer.parse_reply(self.tokens).tool_calls
        except ValueError:  # the model wrote a malformed call: its text stays in the tokens, not in content
            return []
        return [{"id": call.get("id") or f"call_{uuid.uuid4().hex[:9]}", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
                for call in calls]

    def _cut(self, pieces: list[tuple[str, str]], final: bool) -> list[tuple[str, str]]:
        out = []
        for kind, text in pieces:
            if kind != "content" or not self._stop:
                out.append((kind, text))
                continue
            text = self._held + text
            found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
            if found:
                out.append((kind, text[:min(found)]))
                self._held, self.stopped = "", True
                break
            keep = 0 if final else max((n for s in self._stop for n in range(1, len(s)) if text.endswith(s[:n])),
                                       default=0)
            out.append((kind, text[:len(text) - keep]))
            self._held = text[len(text) - keep:]
        return [(kind, text) for kind, text in out if text]


def completion_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(job: Job, ident: str, model: str, text: str, thinking: str, tool_calls: list, finish: str,
             completion_tokens: int) -> dict:
    """The whole (non-streamed) response."""
    if job.chat:
        message = {"role": "assistant", "content": text or (None if tool_calls else ""),
                   **({"reasoning_content": thinking} if thinking else {}),
                   **({"tool_calls": tool_calls} if tool_calls else {})}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": ident, "object": "chat.completion" if job.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(len(job.prompt), completion_tokens)}


def chunk(job: Job, ident: str, model: str, delta: dict | str | None, finish: str | None = None,
          usage_of: dict | None = None) -> dict:
    """One server-sent event's data: a delta (chat: a message delta, else text), or with
    usage_of the last chunk of a stream that asked for usage (no choices)."""
    if usage_of is not None:
        choices = []
    elif job.chat:
        choices = [{"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]
    return {"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            **({"usage": usage_of} if usage_of is not None else {})}
