"""Chat in OpenAI's format against mistral-common 1.13.1, for every tokenizer version: tools, tool
calls and results, thinking and reasoning effort encoded as mistral-common encodes its own
request objects; replies parsed back into what mistral-common encoded, whole and streamed.

Tokenizer files: the ones mistral-common bundles (v1, v2, v3, v7, Tekken v3), and v11, v13, v15
built from its Tekken file with every special token of mistral-common's SpecialTokens in its
table (and, for v15, a model-settings builder that allows a reasoning effort)."""

import json
import os

import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import BUNDLED
from mistral_jax.text.streaming import ReplyStream, StreamDecoder
from mistral_jax.text.tokenizer import Tokenizer

VERSIONS = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
            "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7",
            "tekken-v3": "tekken_240911.json", "v11": None, "v13": None, "v15": None}


def versioned_tekken(directory, version: str) -> str:
    """mistral-common's Tekken file as a tokenizer of `version`, its special tokens listed."""
    d = json.load(open(os.path.join(BUNDLED, "tekken_240911.json")))
    d["config"]["version"] = version
    d["special_tokens"] = [{"rank": i, "token_str": s.value, "is_control": True} for i, s in enumerate(SpecialTokens)]
    if version == "v15":
        d["model_settings_builder"] = {"reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none",
                                                            "values": ["none", "low", "high"]}}
    path = os.path.join(directory, f"tekken_{version}.json")
    with open(path, "w") as f:
        json.dump(d, f)
    return path


@pytest.fixture(scope="module", params=list(VERSIONS))
def pair(request, tmp_path_factory):
    """(version, our Tokenizer, mistral-common's MistralTokenizer) of one file."""
    version = request.param
    path = os.path.join(BUNDLED, VERSIONS[version]) if VERSIONS[version] else versioned_tekken(
        tmp_path_factory.mktemp("tekken"), version)
    return version, Tokenizer(path), MistralTokenizer.from_file(path)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_TOOL = Tool(function=Function(name="get_weather", description="The weather in a city",
                                      parameters=WEATHER["function"]["parameters"]))
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
MISTRAL_CALL = ToolCall(id="abcDEF123", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))

# (OpenAI-format messages, tools, reasoning effort) and the same request in mistral-common's objects.
CONVERSATIONS = {
    "system and turns": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
         {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And 東京? 🙂"}], None, None,
        ChatCompletionRequest(messages=[SystemMessage(content="Be brief."), UserMessage(content="Name a prime."),
                                        AssistantMessage(content="Seven."), UserMessage(content="And 東京? 🙂")])),
    "tools, a call and its result": (
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [CALL]},
         {"role": "tool", "tool_call_id": "abcDEF123", "content": "22C and sunny"}], [WEATHER], None,
        ChatCompletionRequest(tools=[WEATHER_TOOL], messages=[
            SystemMessage(content="Use tools."), UserMessage(content="Weather in Paris?"),
            AssistantMessage(tool_calls=[MISTRAL_CALL]),
            ToolMessage(tool_call_id="abcDEF123", content="22C and sunny")])),
    "thinking in the history": (
        [{"role": "user", "content": "2 + 2?"},
         {"role": "assistant", "content": [{"type": "thinking", "thinking": "Two and two make four."},
                                           {"type": "text", "text": "4"}]},
         {"role": "user", "content": "And 3 + 3?"}], None, None,
        ChatCompletionRequest(messages=[
            UserMessage(content="2 + 2?"),
            AssistantMessage(content=[ThinkChunk(thinking="Two and two make four."), TextChunk(text="4")]),
            UserMessage(content="And 3 + 3?")])),
    "reasoning effort": (
        [{"role": "user", "content": "Prove it."}], [WEATHER], "high",
        ChatCompletionRequest(messages=[UserMessage(content="Prove it.")], tools=[WEATHER_TOOL],
                              reasoning_effort="high")),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_equals_mistral_commons_encoding(pair, name):
    """Our OpenAI-format conversation encodes to mistral-common's tokens of its own request
    objects; where mistral-common refuses the request for this version, so do we, in one line."""
    version, ours, theirs = pair
    messages, tools, effort, request = CONVERSATIONS[name]
    try:
        expected = theirs.encode_chat_completion(request).tokens
    except (MistralCommonException, ValueError, AssertionError) as e:
        with pytest.raises(ValueError, match="not a conversation the chat format accepts") as raised:
            ours.encode_chat(messages, tools=tools, reasoning_effort=effort)
        assert "\n" not in str(raised.value), e
        return
    assert ours.encode_chat(messages, tools=tools, reasoning_effort=effort) == expected


def test_every_feature_is_encoded_somewhere(tmp_path):
    """The versions that take each feature (so the test above compares tokens, not refusals)."""
    accepted = {name: [] for name in CONVERSATIONS}
    for version, file in VERSIONS.items():
        path = os.path.join(BUNDLED, file) if file else versioned_tekken(tmp_path, version)
        theirs = MistralTokenizer.from_file(path)
        for name, (*_, request) in CONVERSATIONS.items():
            try:
                theirs.encode_chat_completion(request)
                accepted[name].append(version)
            except (MistralCommonException, ValueError, AssertionError):
                pass
    assert accepted["system and turns"] == list(VERSIONS)
    assert {"v3", "v7", "v11", "v13", "v15"} <= set(accepted["tools, a call and its result"])
    assert {"v13", "v15"} <= set(accepted["thinking in the history"])
    assert "v15" in accepted["reasoning effort"]


# ---- replies -----------------------------------------------------------------------------------

def assistant_tokens(theirs: MistralTokenizer, message: AssistantMessage) -> list[int]:
    """The tokens mistral-common writes for an assistant message as the model's reply (its
    instruct tokenizer's encode_assistant_message), eos excluded."""
    instruct = theirs.instruct_tokenizer
    reply = instruct.encode_assistant_message(message, is_before_last_user_message=False)
    assert reply[-1] == instruct.tokenizer.eos_id
    return reply[:-1]


REPLIES = {
    "answer": AssistantMessage(content="Paris is the capital."),
    "tool calls only": AssistantMessage(tool_calls=[
        MISTRAL_CALL, ToolCall(id="xyzXYZ987", function=FunctionCall(name="get_time", arguments='{"tz": "CET"}'))]),
    "an answer and tool calls": AssistantMessage(content="Let me check.", tool_calls=[
        MISTRAL_CALL, ToolCall(id="xyzXYZ987", function=FunctionCall(name="get_time", arguments='{"tz": "CET"}'))]),
    "thinking, answer and a call": AssistantMessage(content=[
        ThinkChunk(thinking="The user wants the weather."), TextChunk(text="Checking.")], tool_calls=[MISTRAL_CALL]),
}


def test_replies_parse_back_to_what_mistral_common_encoded(pair):
    """Each reply mistral-common writes in this version, parsed back by ours: the same thinking,
    answer and tool calls (with their ids where the format keeps them); streamed token by token,
    the same text. v1 writes only answers; tool calls from v2, thinking from v13."""
    version, ours, theirs = pair
    written = []
    for name, message in REPLIES.items():
        try:
            tokens = assistant_tokens(theirs, message)
        except (MistralCommonException, ValueError, AssertionError, NotImplementedError):
            continue  # not a reply this version writes
        written.append(name)
        reply = ours.parse_reply(tokens)
        chunks = message.content if isinstance(message.content, list) else [TextChunk(text=message.content or "")]
        assert reply.thinking == "".join(c.thinking for c in chunks if isinstance(c, ThinkChunk)), name
        assert reply.content == "".join(c.text for c in chunks if isinstance(c, TextChunk)), name
        expected_calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                          for c in message.tool_calls or []]
        assert [{k: v for k, v in call.items() if k != "id"} for call in reply.tool_calls] == expected_calls, name
        # Ids where the format writes them: a [CALL_ID] token (v11), or an "id" in v2-v7's JSON list.
        with_ids = ours.control_id("[CALL_ID]") in tokens or '"id"' in theirs.decode(tokens)
        ids = [c.id for c in message.tool_calls or []] if with_ids else []
        assert [call["id"] for call in reply.tool_calls if "id" in call] == ids, name
        stream = ReplyStream(ours.reply_reader(), StreamDecoder(ours))
        pieces = [piece for token in tokens for piece in stream.push([token])] + stream.flush()
        assert "".join(text for kind, text in pieces if kind == "thinking") == reply.thinking, name
        assert "".join(text for kind, text in pieces if kind == "content") == reply.content, name
    assert "answer" in written
    assert version == "v1" or "tool calls only" in written
    assert version not in ("v13", "v15") or "thinking, answer and a call" in written


def test_bad_tool_calls_and_messages_are_one_line_errors(pair):
    version, ours, theirs = pair
    with pytest.raises(ValueError, match="need a role"):
        ours.encode_chat([{"role": "narrator", "content": "Once"}])
    with pytest.raises(ValueError, match="not a conversation the chat format accepts"):
        ours.encode_chat([{"role": "user", "content": ["a part that is no dict"]}])
    with pytest.raises(ValueError, match="lone surrogate"):
        ours.encode_chat([{"role": "user", "content": [{"type": "text", "text": "bad \udcff"}]}])
    calls = ours.control_id("[TOOL_CALLS]")
    if calls is None:
        return
    garbage = [calls] + ours.encode("not json {", bos=False)
    with pytest.raises(ValueError, match="tool call"):
        ours.parse_reply(garbage)
