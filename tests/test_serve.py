"""serve.py's OpenAI-compatible server, driven by OpenAI's own Python client and httpx: answers
equal to HF's greedy choice and to generate() of each request alone, streams, stop strings,
concurrent and late requests, disconnects, every bad request's status and JSON error, SIGTERM."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import openai
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from starlette.testclient import TestClient

import serve
from conftest import REPO, assert_one_line_error, run_script
from mistral_jax.text.tokenizer import Tokenizer
from mistral_jax.serving import api
from mistral_jax.serving.server import ServeOptions, Service, create_app
from test_engine import hf_greedy_recompute
from test_sample_cli import V7, chat_ids, convert_with_tokenizer

MAX_LEN = 512  # the model's window is 8: a long slot costs nothing


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random model with the v7 instruct tokenizer, converted, served by serve.py on a free
    port with 4 slots: (base url, HF reference, checkpoint dir)."""
    ref, checkpoint = convert_with_tokenizer(tmp_path_factory.mktemp("serve"), V7, "tokenizer.model.v7", 32768, 7)
    process, url = start_server(str(checkpoint), "--slots", 4, "--max-len", MAX_LEN, "--steps-per-call", 2,
                                "--max-queue", 32, "--model-name", "tiny")
    yield url, ref, str(checkpoint)
    process.terminate()
    process.wait(120)


def start_server(checkpoint, *flags):
    """serve.py --port 0 as a process, ready: (the process, its base url from the line it prints)."""
    log = tempfile.TemporaryFile("w+")  # stderr (a pipe nobody reads could fill and block the server)
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), "--checkpoint", checkpoint,
                                "--port", "0", *map(str, flags)], stdout=subprocess.PIPE, stderr=log, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    process.log = log
    name = flags[flags.index("--model-name") + 1] if "--model-name" in flags else os.path.basename(checkpoint)
    line = process.stdout.readline()
    assert line.startswith(f"serving {name} at http://127.0.0.1:"), (line, errors_of(process))
    url = line.split(" at ")[1].strip()
    wait_until_ready(url, process)
    return process, url


def errors_of(process) -> str:
    process.log.seek(0)
    return process.log.read()[-3000:]


def wait_until_ready(url, process=None):
    while True:  # compiling takes what it takes; a dead server process ends the wait
        assert process is None or process.poll() is None, errors_of(process)
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def decoded(ids):
    return MistralTokenizer.from_file(V7).decode(ids)


def test_models_and_health(served):
    url, _, _ = served
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ready" and health["slots"] == 4


def test_completions_equal_hf_greedy_streamed_or_not(served):
    url, ref, _ = served
    prompt = "The capital of France is"
    ids = MistralTokenizer.from_file(V7).instruct_tokenizer.tokenizer.encode(prompt, bos=True, eos=False)
    want = decoded(hf_greedy_recompute(ref.model, ids, 24, eos=2))
    c = client(url)
    whole = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert whole.choices[0].text == want
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 24)
    pieces = list(c.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == want
    assert len(pieces) > 2 and pieces[-1].choices[0].finish_reason == "length"
    # A stop string: the text before it, finish "stop", no stop string in it.
    stop = want[len(want) // 2:len(want) // 2 + 3]
    cut = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=["\u00a7", stop])
    assert cut.choices[0].text == want[:want.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in streamed) == want[:want.index(stop)]


def test_chat_completions_equal_hf_greedy_in_the_chat_format(served):
    url, ref, _ = served
    messages = [("system", "Answer in one word."), ("user", "Name a prime.")]
    ids = chat_ids(V7, messages)
    want = decoded(hf_greedy_recompute(ref.model, ids, 20, eos=2))
    c = client(url)
    reply = c.chat.completions.create(model="tiny", messages=[{"role": r, "content": t} for r, t in messages],
                                      max_tokens=20, temperature=0)
    assert reply.choices[0].message.content == want and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": r, "content": t} for r, t in messages],
                                            max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens and not chunks[-1].choices


def test_sixteen_concurrent_requests_each_get_their_solo_result(served):
    """16 requests at once (4 slots: most wait, join and leave mid-run), mixed prompt and answer
    lengths, greedy and sampled with their own seeds: each gets what it gets sent alone, the
    greedy ones HF's greedy text. (The engine's equality to generate() of each request alone is
    tests/test_engine.py's.)"""
    url, ref, _ = served
    rng = np.random.default_rng(3)
    settings = [dict(temperature=0), dict(temperature=0.8), dict(temperature=1.0, top_p=0.9),
                dict(temperature=0.7, extra_body={"top_k": 30})]
    requests = [dict(prompt=rng.integers(3, 32768, int(rng.integers(1, 40))).tolist(),
                     max_tokens=int(rng.integers(1, 30)), seed=int(i), **settings[i % 4]) for i in range(16)]

    async def ask(concurrently):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
            if concurrently:
                return await asyncio.gather(*(c.completions.create(model="tiny", **r) for r in requests))
            return [await c.completions.create(model="tiny", **r) for r in requests]

    together, alone = asyncio.run(ask(True)), asyncio.run(ask(False))
    for r, answer, solo in zip(requests, together, alone):
        assert answer.choices[0].text == solo.choices[0].text, r
        assert answer.choices[0].finish_reason == solo.choices[0].finish_reason, r
        if r["temperature"] == 0:
            assert answer.choices[0].text == decoded(hf_greedy_recompute(ref.model, r["prompt"], r["max_tokens"], 2))
    assert len({a.choices[0].text for a in together}) == 16  # seeds and prompts differ: so do the answers


def test_a_request_arriving_mid_decode_starts_before_the_running_one_ends(served):
    """A long stream is running; a short request sent after its first piece finishes while the
    long one is still streaming (the order of events as the client sees them)."""
    url, _, _ = served
    events = []

    async def stream(c, name, max_tokens, started=None):
        async with c.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append((name, line[6:]))
                    if started is not None and not started.is_set():
                        started.set()

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=None) as c:
            started = asyncio.Event()
            long = asyncio.create_task(stream(c, "long", MAX_LEN - 8, started))
            await started.wait()
            await stream(c, "short", 3)
            await long

    asyncio.run(main())
    order = [name for name, data in events if data == "[DONE]"]
    assert order == ["short", "long"]
    first_short = next(i for i, (name, _) in enumerate(events) if name == "short")
    assert any(name == "long" for name, _ in events[first_short:])  # the long one streamed on meanwhile


def test_a_client_that_leaves_frees_its_slot(served):
    url, _, _ = served
    before = httpx.get(url + "/health").json()["cancelled"]
    with httpx.stream("POST", url + "/v1/completions", json={
            "model": "tiny", "prompt": "Tell me everything.", "max_tokens": MAX_LEN - 16, "temperature": 0,
            "stream": True}) as response:
        next(response.iter_lines())
    while httpx.get(url + "/health").json()["cancelled"] == before:  # the server cancels it; a hang fails by timeout
        time.sleep(0.05)
    while httpx.get(url + "/health").json()["active"]:
        time.sleep(0.05)
    answer = client(url).completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length"


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 40000]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_k": 40000}, 400, "top_k"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": list(range(3, 3 + MAX_LEN))}, 413, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": 5}, 400,
     "tools"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "messages"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{s}-{p}" for _, _, s, p in BAD])
def test_bad_requests_get_their_status_and_json_error(served, path, body, status, param):
    url, _, _ = served
    sent = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url + path, content=sent, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


def test_the_server_keeps_serving_after_bad_requests_and_unknown_paths(served):
    url, _, _ = served
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert httpx.get(url + "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(url).completions.create(model="other", prompt="hi", max_tokens=2)
    assert client(url).completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


def test_a_full_queue_is_429(served):
    """A service whose engine is not stepping (the model loaded here, in this process): requests
    wait until --max-queue of them do, then the next is refused with 429."""
    _, _, checkpoint = served
    service = Service(ServeOptions(checkpoint=checkpoint, slots=1, max_len=32, max_queue=2))
    service.load()
    job = api.completion_job({"model": "m", "prompt": "hi", "max_tokens": 2}, service.tokenizer, service.max_len)

    async def submit_three():
        service.submit(job), service.submit(job)
        with pytest.raises(api.ApiError) as refused:
            service.submit(job)
        return refused.value

    refused = asyncio.run(submit_three())
    assert refused.status == 429 and refused.body()["error"]["type"] == "rate_limit_exceeded"
    assert service.engine.pending == 2


def test_while_loading_requests_get_503(tmp_path):
    """No lifespan run: the model never starts loading."""
    http = TestClient(create_app(ServeOptions(checkpoint=str(tmp_path), model_name="m")))
    assert http.get("/health").status_code == 503
    response = http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"


def test_sigterm_with_a_stream_in_flight_finishes_it_and_exits(served):
    """serve.py as a process: --port 0 prints the address; SIGTERM while a stream runs lets it
    end with [DONE], then the process exits 0."""
    _, _, checkpoint = served
    process, url = start_server(checkpoint, "--slots", 2, "--max-len", 256)
    try:
        lines = []
        with httpx.stream("POST", url + "/v1/completions", timeout=None, json={
                "model": os.path.basename(checkpoint), "prompt": "hi", "max_tokens": 200, "stream": True}) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    process.send_signal(signal.SIGTERM)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        assert process.wait(120) == 0, errors_of(process)
    finally:
        process.kill()


def test_a_checkpoint_that_cannot_serve_is_one_line_error(tmp_path, capsys):
    status, _, err = run_script(capsys, serve, "--checkpoint", tmp_path / "missing")
    assert_one_line_error(status, err, "missing not found")
    status, _, err = run_script(capsys, serve, "--checkpoint", tmp_path, "--slots", "0")
    assert_one_line_error(status, err, "--slots must be a positive integer")
    # A directory with no model in it: said once loading fails, after listening.
    process = subprocess.run([sys.executable, os.path.join(REPO, "serve.py"), "--checkpoint", str(tmp_path),
                              "--tokenizer", V7, "--port", "0"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert_one_line_error(process.returncode, process.stderr, "not found|config")



def test_reply_text_holds_back_what_may_start_a_stop_string():
    """Pushed a token at a time, the pieces join to the text before the first stop string, even
    where the stop string spans tokens; without a match, to the whole text."""
    tokenizer = Tokenizer(V7)
    text = "The quick brown fox jumps over the lazy dog, then sleeps."
    ids = tokenizer.encode(text, bos=False)
    for stop, want in [(("lazy d", "zzz"), text[:text.index("lazy d")]), (("jumps!",), text),
                       (("s over t",), text[:text.index("s over t")])]:
        reply = api.ReplyText(tokenizer, stop, chat=False)
        pieces = [piece for token in ids for _, piece in reply.push([token])] + [p for _, p in reply.flush()]
        assert "".join(pieces) == want
        assert reply.stopped == (want != text)


def test_tool_calls_come_back_in_openai_form():
    """The tool call of an assistant turn as mistral-common encodes it (v7: [TOOL_CALLS] then a
    JSON list) is read back into OpenAI's tool_calls, finish reason tool_calls."""
    tokenizer = Tokenizer(V7)
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": parameters}}]
    call = {"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ids = tokenizer.encode_chat([{"role": "user", "content": "Weather in Paris?"},
                                 {"role": "assistant", "content": None, "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": "abcdefghi", "content": "22 C"}], tools=tools)
    start = ids.index(tokenizer.control_id("[TOOL_CALLS]"))
    turn = ids[start:ids.index(tokenizer.eos_id, start)]  # what the model writes for that turn
    reply = api.ReplyText(tokenizer, (), chat=True)
    assert reply.push(turn) + reply.flush() == []  # no content: a call only
    assert reply.tool_calls() == [call]
    job = api.Job(prompt=[1], max_tokens=5, sampler=None, seed=0, stop=(), stream=False, include_usage=False,
                  chat=True)
    message = api.response(job, "x", "m", "", "", reply.tool_calls(), "tool_calls", 3)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [call]}
