"""The OpenAI-compatible HTTP server: a Starlette app over one Engine (inference/engine.py).

The model loads on a thread of its own after the server starts listening (requests meanwhile
get 503), then that thread runs the engine loop: every JAX call happens there. Handlers on the
event loop check a request (api.py), hand it to the engine and read its tokens back through
an asyncio queue; a client that goes away cancels its request, which frees its slot at the
engine's next step. SIGTERM (uvicorn's graceful shutdown): no new connections, requests in
flight finish (cancelled after `shutdown_timeout` seconds), then the engine thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mistral_jax.checkpoints.store import load_checkpoint
from mistral_jax.inference.engine import PREFILL_BUDGET, Engine, Request
from mistral_jax.model import quantize
from mistral_jax.model.config import MistralConfig
from mistral_jax.model.transformer import param_shardings
from mistral_jax.runtime.platforms import decode_platform
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.runtime.options import OptionError, Quantization, option, require_positive
from mistral_jax.serving import api
from mistral_jax.text.tokenizer import Tokenizer, find_tokenizer

log = logging.getLogger("mistral_jax.serve")


@dataclasses.dataclass(frozen=True)
class ServeOptions(Quantization):
    """What to serve, and where."""

    checkpoint: str = option(help="directory written by convert_weights.py or train.py")
    tokenizer: str | None = option(None, "tokenizer file (default: the checkpoint's tokenizer.model*, tekken.json)")
    model_name: str | None = option(None, "the model's id in the API (default: the checkpoint directory's name)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on; 0 picks a free one (the address is printed)")
    slots: int = option(8, "requests decoded together, each in a row of the batched cache")
    max_len: int | None = option(None, "tokens a slot holds, prompt and answer together (default: the model's "
                                       "max_seq_len)")
    steps_per_call: int = option(4, "decode steps per compiled call: new requests join between calls")
    prefill_budget: int = option(PREFILL_BUDGET, "prompt tokens (padded) prefilled at most between two decode "
                                                 "calls; the first waiting request always goes in")
    max_queue: int = option(64, "requests waiting for a slot before more are refused with 429")
    dtype: str | None = option(None, "compute dtype (default: as stored)", choices=("bfloat16", "float32"))
    mesh: str = option("", "the devices as a mesh, e.g. tensor=4: weights and cache split over them as the sharding "
                           "rules say (default: one device)")
    shutdown_timeout: float = option(30.0, "seconds requests in flight may take to finish after SIGTERM")

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, "slots", "steps_per_call", "prefill_budget", "max_queue")
        if not 0 <= self.port < 65536:
            raise OptionError("port", f"must be in [0, 65535], got {self.port}")
        if self.max_len is not None and self.max_len < 2:
            raise OptionError("max_len", f"must be at least 2, got {self.max_len}")
        if not self.shutdown_timeout >= 0:
            raise OptionError("shutdown_timeout", f"must be >= 0, got {self.shutdown_timeout}")

    @property
    def name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.checkpoint))


class Service:
    """The model behind the API: loading, then ready (or failed), its engine run on one thread."""

    def __init__(self, options: ServeOptions, on_failure: Callable[[], None] = lambda: None):
        self.options, self.on_failure = options, on_failure
        self.status, self.error = "loading", None
        self.tokenizer: Tokenizer | None = None
        self.engine: Engine | None = None
        self.max_len = 0
        self.vision = False  # the model takes images (config.vision)
        self._runs: set[Run] = set()
        self.cancelled = 0  # requests whose client went away before they finished
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stops the engine's thread (after its call in flight); requests still running end
        with an error."""
        self._stopping = True
        for run in list(self._runs):
            run.request.cancelled = True
        if self.engine is not None:
            self.engine.wake()
        self._thread.join(timeout)
        for run in list(self._runs):
            run.fail("the server stopped")

    def load(self) -> None:
        """The tokenizer, the model, its engine, and the programs a first request needs compiled."""
        options = self.options
        path = options.tokenizer or find_tokenizer(options.checkpoint)
        if path is None:
            raise ValueError(f"{options.checkpoint} has no tokenizer file; pass --tokenizer")
        self.tokenizer = Tokenizer(path)
        mesh = make_mesh(options.mesh) if options.mesh else None
        # Read straight onto the mesh: no device holds the whole model.
        shardings = None if mesh is None else param_shardings(MistralConfig.from_dir(options.checkpoint), mesh)
        config, params = load_checkpoint(options.checkpoint, options.dtype, shardings=shardings,
                                         quantize=options.quantize, group=options.quant_group)
        params = quantize.held_for(params, decode_platform(mesh))
        if self.tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocabulary is "
                             f"{config.vocab_size}: they do not belong together")
        self.engine = Engine(config, params, slots=options.slots, max_len=options.max_len,
                             steps_per_call=options.steps_per_call, prefill_budget=options.prefill_budget,
                             eos_id=self.tokenizer.eos_id, mesh=mesh)
        self.max_len, self.vision = self.engine.max_len, config.vision is not None
        self.engine.compile()
        warm = Request([self.tokenizer.bos_id], 1, lambda tokens, finish: True)
        self.engine.submit(warm)
        while self.engine.step():  # compiles admit's smallest bucket
            pass

    def _main(self) -> None:
        try:
            self.load()
        except Exception as e:  # noqa: BLE001 - said by serve() as the process ends, and on /health
            self._failed(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            return
        self.status = "ready"
        print(f"ready: {self.options.name}, {self.options.slots} slots of {self.max_len} tokens", flush=True)
        try:
            self.engine.run(lambda: self._stopping)
        except Exception as e:  # noqa: BLE001 - every request in flight gets the error, then the server stops
            log.debug("the engine stopped", exc_info=True)
            self._failed(f"the engine stopped: {e}")

    def _ended(self, run: Run) -> None:
        if run in self._runs:
            self._runs.discard(run)
            self.cancelled += not run.finished

    def _failed(self, error: str) -> None:
        self.status, self.error = "failed", error
        for run in list(self._runs):
            run.fail(error)
        self.on_failure()

    def require_ready(self) -> None:
        if self.status == "loading":
            raise api.ApiError(503, "the model is loading; retry when /health answers 200")
        if self.status == "failed" or self._stopping:
            raise api.ApiError(503, f"the model is not available: {self.error or 'the server is stopping'}")

    def submit(self, job: api.Job) -> Run:
        if self.engine.pending >= self.options.max_queue:
            raise api.ApiError(429, f"{self.engine.pending} requests are waiting for a slot; retry later")
        run = Run(job, self.tokenizer, asyncio.get_running_loop(), self._ended)
        try:
            self.engine.submit(run.request)
        except ValueError as e:  # what the engine cannot run (a top_k above the vocabulary, ...)
            raise api.ApiError(400, str(e)) from None
        self._runs.add(run)
        return run


class Run:
    """One request in the engine: its reply's text as it comes, through a queue to the handler."""

    def __init__(self, job: api.Job, tokenizer: Tokenizer, loop: asyncio.AbstractEventLoop, done):
        self.job, self.loop, self._done = job, loop, done
        self.text = api.ReplyText(tokenizer, job.stop, job.chat)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.completion_tokens = 0
        self.finished = False
        self.request = Request(job.prompt, job.max_tokens, self._emit, job.sampler, job.seed, images=list(job.images))

    def _emit(self, tokens: list[int], finish: str | None) -> bool:
        """The engine's callback, on its thread."""
        self.completion_tokens += len(tokens) + (finish == "stop")  # eos counts, as vLLM counts it
        pieces = self.text.push(tokens)
        if finish is not None or self.text.stopped:
            pieces += self.text.flush()
            finish = "stop" if self.text.stopped else finish
            if finish == "stop" and self.text.tool_calls():
                finish = "tool_calls"
        return self._put((pieces, finish, None)) and not self.text.stopped

    def fail(self, message: str) -> None:
        self._put(([], "error", message))

    def _put(self, item) -> bool:
        """Hands item to the handler's queue; False once the event loop is gone (shut down)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def cancel(self) -> None:
        self.request.cancelled = True
        self._done(self)

    async def pieces(self) -> AsyncIterator[tuple[list[tuple[str, str]], str | None]]:
        """(pieces, finish) as the engine gives them, until finish."""
        try:
            while True:
                pieces, finish, error = await self.queue.get()
                if error is not None:
                    raise api.ApiError(500, error)
                self.finished = finish is not None
                yield pieces, finish
                if finish is not None:
                    return
        finally:
            self.cancel()


def create_app(options: ServeOptions, service: Service | None = None) -> Starlette:
    """The ASGI app; its lifespan starts the service (loading the model) and stops it."""
    service = service or Service(options)
    name = options.name

    async def health(request: HttpRequest) -> Response:
        body = {"status": service.status, **({"error": service.error} if service.error else {})}
        if service.engine is not None:
            body |= {"slots": service.engine.slots, "active": service.engine.active, "waiting": service.engine.pending,
                     "cancelled": service.cancelled}
        return JSONResponse(body, 200 if service.status == "ready" else 503)

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "mistral_jax",
             "max_model_len": service.max_len or None}]})

    async def generate(request: HttpRequest, chat: bool) -> Response:
        try:
            service.require_ready()
            body = api.parse_body(await request.body())
            api.check_model(body, name)
            if chat:
                job = api.chat_job(body, service.tokenizer, service.max_len, service.vision)
            else:
                job = api.completion_job(body, service.tokenizer, service.max_len)
            run = service.submit(job)
        except api.ApiError as e:
            return JSONResponse(e.body(), e.status)
        ident = api.completion_id(chat)
        if job.stream:
            return EventStream(_events(run, ident, name), run.cancel)
        try:
            result = await _unless_gone(_collect(run, ident, name), request.receive)
        except api.ApiError as e:
            return JSONResponse(e.body(), e.status)
        return JSONResponse(result) if result is not None else Response(status_code=499)

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        await asyncio.to_thread(service.stop)

    async def not_found(request, exc):
        return JSONResponse(api.ApiError(404, f"no such endpoint: {request.method} {request.url.path}").body(), 404)

    async def not_allowed(request, exc):
        return JSONResponse(api.ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(), 405)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_allowed})


async def _collect(run: Run, ident: str, model: str) -> dict:
    text, thinking, finish = [], [], None
    async for pieces, finish in run.pieces():
        for kind, piece in pieces:
            (thinking if kind == "thinking" else text).append(piece)
    return api.response(run.job, ident, model, "".join(text), "".join(thinking), run.text.tool_calls(), finish,
                        run.completion_tokens)


async def _events(run: Run, ident: str, model: str) -> AsyncIterator[str]:
    """The stream's server-sent events' data, ending in [DONE]."""
    job = run.job
    if job.chat:
        yield json.dumps(api.chunk(job, ident, model, {"role": "assistant", "content": ""}))
    try:
        async for pieces, finish in run.pieces():
            for kind, piece in pieces:
                delta = ({"reasoning_content" if kind == "thinking" else "content": piece} if job.chat else piece)
                yield json.dumps(api.chunk(job, ident, model, delta))
            if finish is not None:
                calls = run.text.tool_calls()
                if calls:
                    yield json.dumps(api.chunk(job, ident, model, {"tool_calls": [
                        {"index": i, **call} for i, call in enumerate(calls)]}))
                yield json.dumps(api.chunk(job, ident, model, None, finish))
    except api.ApiError as e:
        yield json.dumps(e.body())
    if job.include_usage:
        yield json.dumps(api.chunk(job, ident, model, None,
                                   usage_of=api.usage(len(job.prompt), run.completion_tokens)))
    yield "[DONE]"


async def _gone(receive) -> None:
    """Returns when the client disconnects (its request body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(work, receive):
    """work's result, or None (work cancelled) if the client disconnects first."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_gone(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
    return task.result() if task.done() and not task.cancelled() else None


class EventStream:
    """A text/event-stream response of `data: ...` events that stops, calling on_close, as
    soon as the client disconnects."""

    def __init__(self, events: AsyncIterator[str], on_close):
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream():
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            async for data in self.events:
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _unless_gone(stream(), receive)
        finally:
            self.on_close()


class _Server(uvicorn.Server):
    """uvicorn's server, but a graceful stop on SIGTERM or Ctrl-C exits 0 (uvicorn re-raises the
    signal once it has stopped, which ends the process as killed by it)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def listen(options: ServeOptions) -> socket.socket:
    """The listening socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {options.host}:{options.port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def serve(options: ServeOptions) -> None:
    """Serves until SIGTERM or Ctrl-C, printing the address once listening; a model that fails
    to load (or an engine that fails) ends the server with its error."""
    if not os.path.isdir(options.checkpoint):
        raise ValueError(f"checkpoint directory {options.checkpoint} not found")
    sock = listen(options)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(None, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=options.shutdown_timeout)
    server = _Server(config)
    service = Service(options, on_failure=lambda: setattr(server, "should_exit", True))
    config.app = create_app(options, service)
    print(f"serving {options.name} at http://{host}:{port}", flush=True)
    server.run(sockets=[sock])
    sys.stdout.flush()
    if service.status == "failed":
        raise ValueError(service.error)
