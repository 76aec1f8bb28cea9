"""`loramix serve`: an OpenAI-compatible server (FastAPI + uvicorn) over one base and several adapters.

    POST /v1/completions       {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", ...}
    POST /v1/chat/completions  {"model", "messages", ...}: only for a tokenizer with a chat template
    GET  /v1/models            the adapters (and "base")
    POST /v1/adapters          {"lora_name", "lora_path"}: load a run dir or PEFT adapter dir on the same base, as vLLM's
                               load_lora_adapter; requests in flight go on meanwhile
    DELETE /v1/adapters/{name} stop serving it: new requests get 404, those in flight finish on it first
    GET  /health
    GET  /metrics              Prometheus text format

Generation runs in one `scheduler.Scheduler` thread that batches all requests, whatever their adapter; the
event loop only validates, queues and streams. Limits: a full queue answers 429 with Retry-After, a body over
`max_body` 413, a bad request 4xx with OpenAI's error body, a failed request 500 with a message (never a
stack trace) while the others go on. A client that leaves frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from loramix.artifacts import ADAPTER, GGUF, MODEL, RUN, adapter_on, kind_of, load_adapters, load_for_generation
from loramix.errors import LoramixError
from loramix.model import context_length
from loramix.serve.api import (
    AdapterCard,
    AdapterLoad,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatDelta,
    ChatReply,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from loramix.serve.lora import BASE, Adapters
from loramix.serve.packed import pack_linears
from loramix.serve.sampler import Sampling
from loramix.serve.scheduler import Event, QueueFull, Scheduler, Sequence

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/health", "/metrics")


@dataclass
class Engine:
    """The scheduler (which owns the model), the tokenizer, and what may be asked of them."""

    scheduler: Scheduler
    tokenizer: object
    max_tokens: int
    context_window: int
    fingerprint: str | None = None  # the base's: an adapter loaded later must have been trained on it
    served: list[str] = field(init=False)  # adapters taking requests (the event loop's view)

    def __post_init__(self):
        self.served = self.scheduler.adapters.names if self.scheduler.adapters else []

    @property
    def names(self) -> list[str]:
        return self.served + ["base"] if self.scheduler.adapters else ["model"]

    def adapter(self, name: str) -> str | None:
        """What a row of the batch runs through: an adapter, BASE, or None (a model without adapters)."""
        return None if not self.scheduler.adapters else BASE if name == "base" else name


def load_engine(sources: list[Path], max_tokens: int, device: torch.device, max_batch: int = 32, max_queue: int = 64, log=print) -> Engine:
    """One base with every adapter in `sources` (run dirs or PEFT adapter dirs on the same base, or folders of
    them), or one model dir or .gguf file.

    Raises:
        LoramixError: a limit below 1, or sources that cannot be served together.
    """
    limits = {"--max-tokens": max_tokens, "--max-batch": max_batch, "--max-queue": max_queue}
    bad = [f"{flag}={value}" for flag, value in limits.items() if value < 1]
    if bad:
        raise LoramixError(f"{', '.join(bad)} must be >= 1")
    sources = [Path(s) for s in sources]
    if len(sources) == 1 and kind_of(sources[0]) in (MODEL, GGUF):
        (model, tok), fingerprint = load_for_generation(sources[0]), None
        model = model.to(device).eval()
    else:
        model, tok, fingerprint = load_adapters([d for s in sources for d in _adapter_dirs(s)])
        model = Adapters(model.to(device).eval())
    scheduler = Scheduler(model, tok, max_batch=max_batch, max_queue=max_queue, log=log)
    pack_linears(scheduler.model)
    return Engine(scheduler, tok, max_tokens, context_length(scheduler.model.config) or 1024, fingerprint)


def _adapter_dirs(source: Path) -> list[Path]:
    """A run dir or adapter dir, or the ones in a folder of them (sorted by name).

    Raises:
        LoramixError: a folder holding none.
    """
    if kind_of(source) in (RUN, ADAPTER) or not source.is_dir():
        return [source]
    found = sorted(d for d in source.iterdir() if kind_of(d) in (RUN, ADAPTER))
    if not found:
        raise LoramixError(f"{source} is not a run dir or adapter dir and holds none; pass run dirs, adapter dirs or a folder of them")
    return found


class ApiError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=None))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class Metrics:
    """Prometheus metrics in a registry of the app's own (two apps in one process never share counts)."""

    def __init__(self, scheduler: Scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("loramix_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.tokens = Counter("loramix_tokens", "Tokens of finished requests, by kind (prompt, completion) and model", ["kind", "model"], registry=r)
        Gauge("loramix_queue_length", "Prompts waiting for a batch slot", registry=r).set_function(lambda: scheduler.queued)
        Gauge("loramix_batch_size", "Sequences in the running batch", registry=r).set_function(lambda: scheduler.batch_size)
        self.step_rows = Histogram("loramix_step_batch_size", "Rows per engine step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.latency = Histogram("loramix_request_latency_seconds", "Time from request to the last byte of the answer, by route", ["route"], registry=r)
        self.first_text = Histogram("loramix_time_to_first_text_seconds", "Time from a streamed request to its first text", registry=r)


@dataclass
class Served:
    """What the routes need: `request.app.state.served`."""

    engine: Engine
    metrics: Metrics
    log: Callable[[str], None]


# ---------------------------------------------------------------- requests in the engine


class Job:
    """A request's sequences in the scheduler, and the events they send back to the event loop."""

    def __init__(self, model: str, prompts: list[list[int]], adapter: str | None, sampling: Sampling, stream: bool, metrics: Metrics):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        self.events_in: asyncio.Queue[Event] = queue
        emit = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)  # called from the scheduler's thread
        self.seqs = [Sequence(ids, adapter, sampling, emit, k, stream) for k, ids in enumerate(prompts)]
        self.model, self.metrics, self.start = model, metrics, time.perf_counter()
        self.texts, self.finish, self.tokens = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)

    async def events(self) -> AsyncIterator[Event]:
        """Every event until all sequences ended.

        Raises:
            ApiError: 500 when a sequence failed (the others are cancelled).
        """
        open_ = len(self.seqs)
        while open_:
            event = await self.events_in.get()
            if event.error:
                self.cancel()
                raise ApiError(500, f"generation failed: {event.error}")
            if event.text and self.seqs[0].stream and not any(self.texts):
                self.metrics.first_text.observe(time.perf_counter() - self.start)
            self.texts[event.index] += event.text
            self.tokens[event.index] = event.tokens
            if event.finish_reason:
                self.finish[event.index], open_ = event.finish_reason, open_ - 1
            yield event
        self.metrics.tokens.labels("prompt", self.model).inc(self.usage().prompt_tokens)
        self.metrics.tokens.labels("completion", self.model).inc(self.usage().completion_tokens)

    async def complete(self, request: Request) -> None:
        """Wait for every sequence to end; a client that disconnects meanwhile cancels them."""
        watch = asyncio.ensure_future(_cancel_on_disconnect(request, self))
        try:
            async for _ in self.events():
                pass
        finally:
            watch.cancel()

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    def usage(self) -> Usage:
        prompt, done = sum(len(s.prompt) for s in self.seqs), sum(self.tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    # The body has been read: the next message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def start_job(served: Served, req: SamplingFields, prompts: list[str], max_tokens: int | None) -> Job:
    """Validate what depends on the served model, then queue the prompts (max_tokens None: as many as fit).

    Raises:
        ApiError: 404 for a model not served, 400 for a bad length or empty prompt, 429 when the queue is full.
    """
    engine = served.engine
    model = req.model or engine.names[0]
    if engine.scheduler.adapters and model not in engine.names:
        raise ApiError(404, f"model {model!r} is not served; choose one of: {', '.join(engine.names)}", "model")
    ids = [engine.tokenizer(p)["input_ids"] for p in prompts]
    if not all(ids):
        raise ApiError(400, "a prompt is empty; give at least one token of text", "prompt")
    longest = max(len(x) for x in ids)
    max_tokens = max_tokens or max(1, min(engine.max_tokens, engine.context_window - longest))
    if not 1 <= max_tokens <= engine.max_tokens:
        raise ApiError(400, f"max_tokens must be an integer in [1, {engine.max_tokens}]", "max_tokens")
    if longest + max_tokens > engine.context_window:
        raise ApiError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the context window of {engine.context_window} tokens", "prompt")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    seed = req.seed if req.seed is not None else secrets.randbits(63)  # unseeded requests differ, as OpenAI's do
    sampling = Sampling(max_tokens, req.temperature, req.top_k, req.top_p, req.repetition_penalty, seed, stop)
    job = Job(model, ids, engine.adapter(model), sampling, req.stream, served.metrics)
    try:
        engine.scheduler.submit(job.seqs)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}; retry later", headers={"Retry-After": "1"}) from None
    return job


def _sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def event_stream(job: Job, render: Callable[[Event], BaseModel], opening: BaseModel | None, usage: Callable[[Usage], BaseModel] | None) -> StreamingResponse:
    """Server-sent events: `opening`, one chunk per event, the usage chunk when asked for, then [DONE].
    A client that leaves ends the stream (Starlette cancels it) and so cancels the job."""

    async def lines() -> AsyncIterator[str]:
        try:
            if opening is not None:
                yield _sse(opening)
            async for event in job.events():
                yield _sse(render(event))
            if usage is not None:
                yield _sse(usage(job.usage()))
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the status is sent already: the error goes in the stream, as OpenAI's does
            yield _sse(ErrorResponse(error=ErrorBody(message=str(e), type="server_error", param=None, code=None)))
        finally:
            job.cancel()

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- routes


async def completions(body: CompletionRequest, request: Request):
    served: Served = request.app.state.served
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    job = start_job(served, body, prompts, body.max_tokens or 16)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def completion(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=cid, created=created, model=job.model, choices=choices, usage=usage)

    if body.stream:
        render = lambda e: completion([CompletionChoice(text=e.text, index=e.index, finish_reason=e.finish_reason)])
        wants_usage = body.stream_options is not None and body.stream_options.include_usage
        return event_stream(job, render, None, (lambda u: completion([], u)) if wants_usage else None)
    await job.complete(request)
    choices = [CompletionChoice(text=t, index=k, finish_reason=f) for k, (t, f) in enumerate(zip(job.texts, job.finish))]
    return completion(choices, job.usage())


async def chat_completions(body: ChatRequest, request: Request):
    served: Served = request.app.state.served
    tokenizer = served.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions with a prompt", "messages")
    prompt = tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages], tokenize=False, add_generation_prompt=True)
    job = start_job(served, body, [prompt], body.max_completion_tokens or body.max_tokens)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: ChatDelta | None, finish: str | None = None, usage: Usage | None = None) -> ChatChunk:
        choices = [] if delta is None else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatChunk(id=cid, created=created, model=job.model, choices=choices, usage=usage)

    if body.stream:
        render = lambda e: chunk(ChatDelta(content=e.text), e.finish_reason)
        wants_usage = body.stream_options is not None and body.stream_options.include_usage
        return event_stream(job, render, chunk(ChatDelta(role="assistant", content="")), (lambda u: chunk(None, usage=u)) if wants_usage else None)
    await job.complete(request)
    choice = ChatChoice(index=0, message=ChatReply(content=job.texts[0]), finish_reason=job.finish[0])
    return ChatCompletion(id=cid, created=created, model=job.model, choices=[choice], usage=job.usage())


async def models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=name) for name in request.app.state.served.engine.names])


async def load_adapter(body: AdapterLoad, request: Request) -> AdapterCard:
    """Load an adapter in the scheduler's thread between two steps; the base check (which may build a base) runs
    in a worker thread meanwhile."""
    engine: Engine = request.app.state.served.engine
    adapters, name = engine.scheduler.adapters, body.lora_name
    if adapters is None:
        raise ApiError(400, "this server runs one model without adapters; start it on run dirs or adapter dirs to load more")
    if name in engine.names:
        raise ApiError(400, f"an adapter named {name!r} is served already; DELETE /v1/adapters/{name} first or pick another name", "lora_name")
    try:
        path = await asyncio.to_thread(adapter_on, Path(body.lora_path), engine.fingerprint)
        await asyncio.wrap_future(engine.scheduler.call(lambda: adapters.add(name, path)))
    except LoramixError as e:
        raise ApiError(400, str(e), "lora_path") from None
    engine.served.append(name)
    request.app.state.served.log(f"loaded adapter {name} from {body.lora_path}")
    return AdapterCard(id=name)


async def unload_adapter(name: str, request: Request) -> AdapterCard:
    engine: Engine = request.app.state.served.engine
    if name not in engine.served:
        raise ApiError(404, f"no adapter {name!r} is served; GET /v1/models lists them")
    engine.served.remove(name)  # no new request from now on; the ones in flight finish on it, then it goes
    engine.scheduler.call(lambda: engine.scheduler.retire(name))
    request.app.state.served.log(f"unloading adapter {name}")
    return AdapterCard(id=name, deleted=True)


async def health() -> dict:
    return {"status": "ok"}


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.served.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------- the app


class CountRequests:
    """ASGI middleware: every answer's status and latency into the metrics (streams until their last byte)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, start, status = scope["path"] if scope["path"] in ROUTES else "other", time.perf_counter(), 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class RefuseLargeBodies:
    """ASGI middleware: a body over the limit gets 413 with OpenAI's error body: at once when its
    Content-Length says so, else as soon as the bytes received pass it (FastAPI's own limit answers in
    plain text)."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = Headers(scope=scope).get("content-length", "")
        if size.isdigit() and int(size) > self.max_body:
            return await error_response(413, self._message(int(size)))(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # the app's HTTPException handler answers it
                raise HTTPException(413, self._message(received))
            return message

        return await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return f"the request body is {size:,} bytes or more, over the server's limit of {self.max_body:,}; send less"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the field and what it takes, from pydantic's errors."""
    errors = exc.errors()
    unknown = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return f"unknown field(s): {', '.join(unknown)}", unknown[0]
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})", None
    fields = [str(x) for x in first["loc"][1:] if not str(x).startswith(("str", "list[", "function-"))]
    if not fields:
        return "the request body must be a JSON object", None
    message, name = str(first["msg"]).removeprefix("Value error, "), ".".join(fields)
    if first["type"] == "missing":
        return f"{name} is required", fields[0]
    return (message if message.startswith(fields[0]) else f"{name}: {message}"), fields[0]


def build_app(engine: Engine, log=print, max_body: int = 1 << 20) -> FastAPI:
    """The FastAPI app over `engine`; the engine's scheduler must run (`engine.scheduler.running()`)."""
    app = FastAPI(title="loramix", strict_content_type=False, openapi_url=None)
    app.state.served = Served(engine, Metrics(engine.scheduler), log)
    engine.scheduler.on_step = app.state.served.metrics.step_rows.observe
    app.add_middleware(RefuseLargeBodies, max_body=max_body)
    app.add_middleware(CountRequests, metrics=app.state.served.metrics)  # outermost: counts the 413s too
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/adapters", load_adapter, methods=["POST"])
    app.add_api_route("/v1/adapters/{name}", unload_adapter, methods=["DELETE"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, *_validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"no route {request.url.path}; use POST /v1/completions or /v1/chat/completions, GET /v1/models, /health or "
                                       "/metrics, POST or DELETE /v1/adapters")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log(f"error: {type(exc).__name__}: {exc}")  # the trace stays in the server; the client gets one line
        return error_response(500, "internal error; see the server log")

    return app


@dataclass
class Running:
    url: str  # http://host:port (the API is under /v1)
    thread: threading.Thread

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C ends the block that started it)."""
        while self.thread.is_alive():
            self.thread.join(0.5)


@contextlib.contextmanager
def running(engine: Engine, host: str = "127.0.0.1", port: int = 0, log=print, max_body: int = 1 << 20) -> Iterator[Running]:
    """The server on host:port (0: any free port) in a thread, its scheduler in another, until the block ends.

    Raises:
        LoramixError: the address cannot be bound, or the server did not start.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LoramixError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None
    config = uvicorn.Config(build_app(engine, log, max_body), log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="loramix-http", daemon=True)
    with engine.scheduler.running():
        thread.start()
        try:
            while not server.started and thread.is_alive():
                time.sleep(0.01)
            if not server.started:
                raise LoramixError(f"the server on {host}:{port} did not start; see the messages above")
            yield Running(f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}", thread)
        finally:
            server.should_exit = True
            thread.join()
            sock.close()


def serve(sources: list[Path], host: str, port: int, max_tokens: int, device: torch.device, max_batch: int = 32, max_queue: int = 64, log=print) -> None:
    """Serve until Ctrl-C."""
    engine = load_engine(sources, max_tokens, device, max_batch, max_queue, log)
    with running(engine, host, port, log) as server:
        log(f"serving {', '.join(engine.names)} on {server.url}/v1 (batches of up to {max_batch}, {max_queue} waiting; Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            server.wait()
