"""`loramix serve`: an OpenAI-compatible completions server over one base and several adapters.

    POST /v1/completions   {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", ...}
    GET  /v1/models        the adapters (and "base")
    GET  /health

Requests are queued behind one lock, so concurrent requests never mix outputs or adapters. Every bad
request gets a 4xx with an OpenAI-style error body; an unexpected failure a 500 without a stack trace.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from loramix.artifacts import MODEL, kind_of, load_adapters, load_for_generation
from loramix.generation import Sampling, generate
from loramix.model import context_length

ALLOWED = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "n", "echo",
           "user", "repetition_penalty", "logprobs", "frequency_penalty", "presence_penalty", "best_of", "suffix", "stream_options"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Engine:
    """The model with its named adapters, the tokenizer, and the lock that queues requests."""

    model: object
    tokenizer: object
    adapters: list[str]
    max_tokens: int
    lock: threading.Lock

    @property
    def names(self) -> list[str]:
        return self.adapters + (["base"] if self.adapters else [])


def load_engine(sources: list[Path], max_tokens: int, device: torch.device) -> Engine:
    """One base with every adapter in `sources` (run dirs or PEFT adapter dirs on the same base), or one model dir."""
    sources = [Path(s) for s in sources]
    if len(sources) == 1 and kind_of(sources[0]) == MODEL:
        model, tok = load_for_generation(sources[0])
        return Engine(model.to(device).eval(), tok, [], max_tokens, threading.Lock())
    model, tok, names = load_adapters(sources)
    return Engine(model.to(device).eval(), tok, names, max_tokens, threading.Lock())


def parse_request(body: bytes, engine: Engine) -> dict:
    """Validate a completions request; raise BadRequest naming the field and what is allowed."""
    try:
        req = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(req) - ALLOWED)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    model = req.get("model")
    if engine.adapters and model not in engine.names:
        raise BadRequest(f"model {model!r} is not served; choose one of: {', '.join(engine.names)}", 404, "model")
    prompt = req.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompt must be a string or a non-empty list of strings", param="prompt")
    if req.get("n", 1) != 1 or req.get("best_of", 1) != 1 or req.get("echo", False) or req.get("logprobs") is not None or req.get("suffix") is not None:
        raise BadRequest("n, best_of, echo, logprobs and suffix are not supported (use their defaults)")
    max_tokens = req.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= engine.max_tokens:
        raise BadRequest(f"max_tokens must be an integer in [1, {engine.max_tokens}]", param="max_tokens")
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("stop must be a string or a list of up to 4 non-empty strings", param="stop")
    numbers = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "repetition_penalty": (0.0, 10.0)}
    for key, (low, high) in numbers.items():
        v = req.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not low <= v <= high or (key != "temperature" and v == 0)):
            raise BadRequest(f"{key} must be a number in {'[' if key == 'temperature' else '('}{low}, {high}]", param=key)
    n_pos = context_length(engine.model.config) or 1024
    longest = max(len(engine.tokenizer(p)["input_ids"]) for p in prompts)
    if longest + max_tokens > n_pos:
        raise BadRequest(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the context window of {n_pos} tokens", param="prompt")
    return {"model": model or (engine.names[0] if engine.names else "model"), "prompts": prompts, "max_tokens": max_tokens,
            "temperature": float(req.get("temperature", 1.0)), "top_p": float(req.get("top_p", 1.0)), "top_k": int(req.get("top_k", 0) or 0),
            "repetition_penalty": float(req.get("repetition_penalty", 1.0)), "stop": tuple(stop), "seed": int(req.get("seed", 0) or 0),
            "stream": bool(req.get("stream", False))}


def complete(engine: Engine, r: dict, stream=None) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) per prompt, generated under the engine's lock."""
    s = Sampling(r["max_tokens"], r["temperature"], r["top_k"], r["top_p"], r["repetition_penalty"], r["seed"], r["stop"])
    with engine.lock:
        if engine.adapters and r["model"] != "base":
            engine.model.set_adapter(r["model"])
        adapter_off = engine.adapters and r["model"] == "base"
        out = []
        with engine.model.disable_adapter() if adapter_off else contextlib.nullcontext():
            for prompt in r["prompts"]:
                (text,), _ = generate(engine.model, engine.tokenizer, [prompt], s, stream=stream)
                n = len(engine.tokenizer(text)["input_ids"])
                out.append((text, "length" if n >= r["max_tokens"] else "stop", n))
        return out


class Handler(BaseHTTPRequestHandler):
    """One request per call; `make_handler` binds the engine and the log."""

    protocol_version = "HTTP/1.1"
    engine: Engine
    log = staticmethod(print)

    def log_message(self, fmt, *args):  # one line per request through our log
        self.log(f"{self.address_string()} {fmt % args}")

    def _json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def do_GET(self):
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            names = self.engine.names or ["model"]
            self._json(200, {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "loramix"} for n in names]})
        else:
            self._error(404, f"no route {self.path}; use /v1/completions, /v1/models or /health")

    def do_POST(self):
        if self.path != "/v1/completions":
            self._error(404, f"no route {self.path}; POST /v1/completions")
            return
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            req = parse_request(body, self.engine)
            if req["stream"]:
                self._stream(req)
                return
            results = complete(self.engine, req)
            usage_prompt = sum(len(self.engine.tokenizer(p)["input_ids"]) for p in req["prompts"])
            usage_done = sum(n for _, _, n in results)
            self._json(200, {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()), "model": req["model"],
                "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": f} for i, (t, f, _) in enumerate(results)],
                "usage": {"prompt_tokens": usage_prompt, "completion_tokens": usage_done, "total_tokens": usage_prompt + usage_done},
            })
        except BadRequest as e:
            self._error(e.status, str(e), e.param)
        except Exception as e:  # never a stack trace to the client
            self.log(f"error: {type(e).__name__}: {e}")
            self._error(500, "internal error while generating; see the server log")

    def _stream(self, req: dict) -> None:
        if len(req["prompts"]) != 1:
            raise BadRequest("stream=true takes one prompt", param="prompt")
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def chunk(text: str, finish: str | None) -> None:
            event = {"id": cid, "object": "text_completion", "created": created, "model": req["model"],
                     "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

        emitted, done = [], False

        def on_text(piece: str) -> None:
            # Text arrives before stop strings are cut: emit up to the first stop string, then nothing.
            nonlocal done
            if done or not piece:
                return
            full = "".join(emitted) + piece
            cuts = [full.index(x) for x in req["stop"] if x in full]
            if cuts:
                piece, done = full[: min(cuts)][len("".join(emitted)) :], True
            if piece:
                emitted.append(piece)
                chunk(piece, None)

        ((_, finish, _),) = complete(self.engine, req, stream=on_text)
        chunk("", finish)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_handler(engine: Engine, log) -> type[Handler]:
    return type("BoundHandler", (Handler,), {"engine": engine, "log": staticmethod(log)})


def serve(sources: list[Path], host: str, port: int, max_tokens: int, device: torch.device, log=print) -> None:
    engine = load_engine(sources, max_tokens, device)
    server = ThreadingHTTPServer((host, port), make_handler(engine, log))
    log(f"serving {', '.join(engine.names or ['model'])} on http://{host}:{server.server_address[1]}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
