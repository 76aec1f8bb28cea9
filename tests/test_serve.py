"""The server on loopback with the official `openai` client (two adapters and base, batched together), the
batching engine's exactness against each request alone, and the limits: 429, 413, disconnects, failures."""

import contextlib
import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from loramix.artifacts import load_adapters, load_for_generation
from loramix.config import load_config
from loramix.errors import LoramixError
from loramix.generation import generate
from loramix.serve import kv
from loramix.serve import scheduler as sched
from loramix.serve.http import load_engine, running
from loramix.serve.lora import BASE, Adapters
from loramix.serve.packed import pack_linears
from loramix.serve.sampler import Sampling
from loramix.training import train

from conftest import ROOT, TINY

openai = pytest.importorskip("openai")
PROMPTS = ("Once upon a time", "The market")
quiet = lambda *a: None


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, cache_dir, tiny_run) -> list[Path]:
    root = tmp_path_factory.mktemp("serve")
    dirs = [Path(shutil.copytree(tiny_run.run_dir, root / "alpha"))]  # adapters are named by their dirs
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache_dir}", "train.seed=1"])
    dirs.append(train(cfg, root / "beta", log=quiet).run_dir)
    # A tiny random model's greedy text hardly depends on a few steps of LoRA: make beta's adapter strong,
    # so that routing a request to the wrong adapter changes the text.
    from safetensors.torch import load_file, save_file

    path = dirs[1] / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 200 if "lora_B" in k else v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return dirs


@pytest.fixture(scope="module")
def server(adapter_dirs):
    engine = load_engine(adapter_dirs, max_tokens=32, device=torch.device("cpu"), max_batch=8, log=quiet)
    expected = {}
    for d in adapter_dirs:  # each adapter merged into its own model, through transformers' generate
        model, tok = load_for_generation(d)
        for prompt in PROMPTS:
            expected[d.name, prompt] = generate(model, tok, [prompt], Sampling(max_new_tokens=8))[0][0]
    with running(engine, log=quiet) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0), srv.url, expected, engine


@pytest.mark.e2e
def test_completions_per_adapter(server):
    client, _, expected, _ = server
    for name in ("alpha", "beta"):
        r = client.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert r.choices[0].text == expected[name, "Once upon a time"]
        assert r.model == name and r.usage.prompt_tokens == 4 and r.choices[0].finish_reason in ("length", "stop")
    assert expected["alpha", "Once upon a time"] != expected["beta", "Once upon a time"]
    assert {m.id for m in client.models.list()} == {"alpha", "beta", "base"}
    r = client.completions.create(model="beta", prompt=list(PROMPTS), max_tokens=8, temperature=0)  # one request, two prompts
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [expected["beta", p] for p in PROMPTS]


@pytest.mark.e2e
def test_streaming_equals_non_streaming(server):
    client, _, expected, _ = server
    chunks = list(client.completions.create(model="beta", prompt="The market", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["beta", "The market"]
    assert chunks[-2].choices[0].finish_reason in ("length", "stop") and chunks[-1].usage.prompt_tokens == 2


@pytest.mark.e2e
def test_concurrent_requests_share_batches_and_never_mix(server):
    client, url, expected, _ = server
    jobs = [(name, prompt) for name in ("alpha", "beta") for prompt in PROMPTS] * 2
    results = [None] * len(jobs)

    def ask(k, name, prompt):
        results[k] = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(k, *job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected[job] for job in jobs]
    with urllib.request.urlopen(f"{url}/metrics") as r:
        text = r.read().decode()
    rows = {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("loramix_step_batch_size_bucket")}
    assert rows["1.0"] < rows["+Inf"], "no step ran more than one row"
    assert 'loramix_requests_total{route="/v1/completions",status="200"}' in text


@pytest.mark.e2e
def test_chat_needs_a_template_and_then_works(server):
    client, _, _, engine = server
    messages = [{"role": "user", "content": "Once upon a time"}]
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="alpha", messages=messages, max_tokens=8)
    engine.tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    try:
        r = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0)
        plain = client.completions.create(model="alpha", prompt="user: Once upon a time\nassistant:", max_tokens=8, temperature=0)
        chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0, stream=True))
    finally:
        engine.tokenizer.chat_template = None
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == plain.choices[0].text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].text


@pytest.mark.e2e
def test_bad_requests_get_4xx_with_a_message(server):
    client, url, _, _ = server
    with pytest.raises(openai.NotFoundError, match="model 'gamma' is not served"):
        client.completions.create(model="gamma", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be an integer in \[1, 32\]"):
        client.completions.create(model="alpha", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        client.completions.create(model="alpha", prompt="x", max_tokens=4, extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="exceeds the context window"):
        client.completions.create(model="alpha", prompt="word " * 1020, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="temperature: Input should be less than or equal to 2"):
        client.completions.create(model="alpha", prompt="x", max_tokens=4, temperature=5)
    for body, status, message in [(b"{not json", 400, "not valid JSON"), (b"[1]", 400, "must be a JSON object")]:
        request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        assert e.value.code == status and message in json.loads(e.value.read())["error"]["message"]
    host, port = url.removeprefix("http://").split(":")
    # declared too long: answered before the body is sent (sending it first races the server's early answer and close)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 413 and "over the server's limit of 1,048,576" in json.loads(answer.read())["error"]["message"]
    conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # sent in chunks, with no Content-Length to refuse it by
    conn.request("POST", "/v1/completions", body=iter([b" " * (1 << 19)] * 3), headers={"Content-Type": "application/json"}, encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 413 and "over the server's limit" in json.loads(answer.read())["error"]["message"]
    conn.close()
    with urllib.request.urlopen(f"{url}/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}


@pytest.mark.e2e
def test_a_failing_request_fails_alone(server, monkeypatch):
    client, _, expected, _ = server

    def sample_rows(logits, seqs):
        if any(seq.sampling.seed == 13 for seq in seqs):
            raise RuntimeError("injected")
        return real(logits, seqs)

    real = sched.sample_rows
    monkeypatch.setattr(sched, "sample_rows", sample_rows)
    results = {}

    def ask(seed):
        try:
            results[seed] = client.completions.create(model="beta", prompt="The market", max_tokens=8, temperature=0, seed=seed).choices[0].text
        except openai.InternalServerError as e:
            results[seed] = e

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (1, 13, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[1] == results[2] == expected["beta", "The market"]
    assert isinstance(results[13], openai.InternalServerError)
    assert results[13].body["message"] == "generation failed: RuntimeError: injected" and "Traceback" not in str(results[13].body)


# ---------------------------------------------------------------- limits on a slowed engine


@pytest.fixture
def slow_server(adapter_dirs, monkeypatch):
    """One batch slot, two queue places, 20 ms per step; `seqs` collects every submitted sequence."""
    engine = load_engine(adapter_dirs, max_tokens=32, device=torch.device("cpu"), max_batch=1, max_queue=2, log=quiet)
    gate, seqs = threading.Event(), []
    step, submit = engine.scheduler.step, engine.scheduler.submit

    def slow_step():
        gate.wait()
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine.scheduler, "step", slow_step)
    monkeypatch.setattr(engine.scheduler, "submit", lambda new: (submit(new), seqs.extend(new)))
    with running(engine, log=quiet) as srv:
        yield srv.url, engine, gate, seqs
        gate.set()


def _wait(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _post(url: str, body: dict):
    """(status, headers (case-insensitive), JSON body)"""
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.mark.e2e
def test_a_full_queue_answers_429_and_the_queued_complete(slow_server):
    url, engine, gate, _ = slow_server
    body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(_post(url, body))) for _ in range(2)]
    for t in threads:
        t.start()
    _wait(lambda: engine.scheduler.queued == 2)  # the engine is held at its gate: both wait
    status, headers, error = _post(url, body)
    assert status == 429 and headers.get("Retry-After") == "1" and "busy" in error["error"]["message"]
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert [a[0] for a in answers] == [200, 200] and answers[0][2]["choices"] == answers[1][2]["choices"]


@pytest.mark.e2e
def test_a_client_that_leaves_frees_its_slot(slow_server):
    url, engine, gate, seqs = slow_server
    gate.set()
    host, port = url.removeprefix("http://").split(":")
    for stream in (True, False):
        n = len(seqs)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"model": "beta", "prompt": "The market", "max_tokens": 32, "temperature": 0, "stream": stream}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        _wait(lambda n=n: len(seqs) > n and len(seqs[n].tokens) >= 2)  # it is generating (20 ms a token, 32 tokens)
        if stream:
            assert conn.getresponse().status == 200
        conn.sock.shutdown(2)
        conn.close()
        _wait(lambda n=n: seqs[n].done and engine.scheduler.batch_size == 0)
        assert seqs[n].cancelled and len(seqs[n].tokens) < 32


@pytest.mark.e2e
def test_a_stalled_client_holds_neither_the_engine_nor_the_others(adapter_dirs, monkeypatch):
    """A streaming client whose connection takes no more bytes (its sends never return): its row still runs to
    its end and leaves, and a request sent meanwhile is answered."""
    import asyncio

    from loramix.serve import http as serve

    def build_app(*args, **kwargs):
        app = real(*args, **kwargs)

        async def stalling(scope, receive, send):
            async def stalled_send(message):
                if message["type"] == "http.response.body" and message.get("body"):
                    await asyncio.Event().wait()  # as a full socket buffer would hold it, for good
                await send(message)

            stalled = scope["type"] == "http" and (b"x-stall", b"1") in scope["headers"]
            await app(scope, receive, stalled_send if stalled else send)

        return stalling

    real = serve.build_app
    monkeypatch.setattr(serve, "build_app", build_app)
    engine = load_engine(adapter_dirs, max_tokens=32, device=torch.device("cpu"), max_batch=4, log=quiet)
    seqs, submit = [], engine.scheduler.submit
    monkeypatch.setattr(engine.scheduler, "submit", lambda new: (submit(new), seqs.extend(new)))
    with running(engine, log=quiet) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        stalled = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"model": "beta", "prompt": "The market", "max_tokens": 32, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        stalled.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json", "X-Stall": "1"})
        _wait(lambda: seqs and seqs[0].tokens)
        status, _, answer = _post(srv.url, {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert status == 200 and answer["usage"]["completion_tokens"] == 8
        _wait(lambda: seqs[0].done and engine.scheduler.batch_size == 0)
        assert len(seqs[0].tokens) == 32 and not seqs[0].cancelled
        stalled.close()


# ---------------------------------------------------------------- exactness of the batch


@pytest.mark.parity
def test_batched_logits_equal_each_request_alone(adapter_dirs, monkeypatch):
    """Mixed adapters and base, prompts of 1-12 tokens, requests joining mid-way and leaving early: every
    row's logits, through the packed LM head as served, equal those of its request alone (no batch, no cache, the
    adapter made active, transformers' own head) to 1e-4. The KV cache keeps room for 3 columns only, so it
    grows in place and into new buffers, after joins and departures alike."""
    monkeypatch.setattr(kv, "_ROOM", 3)
    stock, tok, _ = load_adapters(adapter_dirs)
    stock.eval()
    model = Adapters(load_adapters(adapter_dirs)[0].eval())
    assert pack_linears(model.peft) == 1  # the head: the tiny body's layers are under the size worth packing
    texts = ["Once upon a time", "The", "A much longer prompt that goes on and on for a while", "The market", "x y z", "Markets rallied today after"]
    adapters = ["alpha", "beta", BASE, "beta", "alpha", BASE]
    settings = [Sampling(max_new_tokens=4 + 2 * k, temperature=0.0 if k % 2 else 0.9, seed=k, repetition_penalty=1.0 + 0.1 * (k % 3))
                for k in range(len(texts))]

    def sequences():
        return [sched.Sequence(tok(t)["input_ids"], a, s, quiet, k) for k, (t, a, s) in enumerate(zip(texts, adapters, settings))]

    batched = sequences()
    seen = {s: [] for s in batched}
    scheduler = sched.Scheduler(model, tok, max_batch=4)  # fewer slots than requests: some wait for others to leave
    for k in range(60):
        if k in (0, 2, 5):  # three arrivals: 3, 2, then 1 request
            scheduler.submit(batched[{0: slice(0, 3), 2: slice(3, 5), 5: slice(5, 6)}[k]])
        for seq, logits in scheduler.step().items():
            seen[seq].append(logits)
    assert all(s.done for s in batched) and sum(map(len, seen.values())) > 30
    for seq in batched:
        ids = torch.tensor([seq.prompt + seq.tokens[:-1]])
        with torch.no_grad(), stock.disable_adapter() if seq.adapter == BASE else contextlib.nullcontext():
            if seq.adapter != BASE:
                stock.set_adapter(seq.adapter)
            alone = stock(input_ids=ids).logits[0, len(seq.prompt) - 1 :]
        torch.testing.assert_close(torch.stack(seen[seq]), alone, atol=1e-4, rtol=0)
    for seq, single in zip(batched, sequences()):  # the same tokens, greedy or seeded sampling, with no company
        one = sched.Scheduler(model, tok)
        one.submit([single])
        while not single.done:
            one.step()
        assert single.tokens == seq.tokens
    assert len({tuple(s.tokens) for s in batched}) == len(batched)


@pytest.mark.unit
def test_the_growing_cache_holds_what_transformers_cache_holds(monkeypatch):
    """Decode steps past the room, a crop and a selection of rows (which replace a layer's tensors): the growing
    layer returns the same keys and values as transformers' DynamicLayer after every update."""
    from transformers.cache_utils import DynamicLayer

    monkeypatch.setattr(kv, "_ROOM", 2)
    ours, theirs, gen = kv.cache().layer_class_to_replicate(), DynamicLayer(), torch.Generator().manual_seed(0)
    for step in range(8):
        new = [torch.randn(3 if step < 5 else 2, 2, 4 if step == 0 else 1, 5, generator=gen) for _ in range(2)]
        for a, b in zip(ours.update(*new), theirs.update(*new)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        if step == 2:
            ours.crop(-1), theirs.crop(-1)
        if step == 4:
            rows = torch.tensor([2, 0])
            ours.batch_select_indices(rows), theirs.batch_select_indices(rows)


@pytest.mark.unit
@torch.inference_mode()  # as the scheduler's forwards, which the buffers are made in
def test_rows_join_and_leave_the_cache_in_place(monkeypatch):
    """Rows joining (a narrower batch, then a wider one) and leaving (with leading columns cut), decode steps
    between: the cache holds what padding, concatenating and indexing would, and a join or departure that fits
    the room writes into the same buffers, moving only the rows that change place."""
    monkeypatch.setattr(kv, "_ROOM", 4)
    gen = torch.Generator().manual_seed(0)
    states = lambda rows, columns: [torch.randn(rows, 2, columns, 3, generator=gen) for _ in range(2)]
    left = lambda t, width: torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))

    def prefill(rows, columns):
        cache, new = kv.cache(), states(rows, columns)
        cache.update(*new, 0)
        return cache, new

    batch, ref = prefill(3, 5)
    joins = {1: (2, 2), 2: (1, 3), 5: (1, 10), 6: (1, 20)}  # rows, columns; in place at 2 (room for rows) and 5 (columns cut)
    for step in range(9):
        if step in joins:
            new, part = prefill(*joins[step])
            width = max(ref[0].shape[-2], part[0].shape[-2])
            before = batch.layers[0]._buffers[0].data_ptr()
            kv.join(batch, new, width, most_rows=8)
            ref = [torch.cat([left(r, width), left(p, width)]) for r, p in zip(ref, part)]
            assert (batch.layers[0]._buffers[0].data_ptr() == before) == (step in (2, 5))
        if step == 4:  # rows 0 and 2 of 6 leave: the last two take their places; 2 columns cut
            order = kv.compact([1, 3, 4, 5])
            assert order == [4, 1, 5, 3]
            before = batch.layers[0]._buffers[0].data_ptr()
            kv.select(batch, order, 2)
            ref = [r[order][:, :, 2:] for r in ref]
            assert batch.layers[0]._buffers[0].data_ptr() == before
        new = states(len(ref[0]), 1)
        out = batch.update(*new, 0)
        ref = [torch.cat([r, n], -2) for r, n in zip(ref, new)]
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    batch.layers[0].crop(-1)  # views replaced: a selection indexes them, the next update copies them into new buffers
    ref = [r[:, :, :-1][[1, 0]] for r in ref]
    kv.select(batch, [1, 0], 0)
    new = states(2, 1)
    for a, r, n in zip(batch.update(*new, 0), ref, new):
        torch.testing.assert_close(a, torch.cat([r, n], -2), atol=0, rtol=0)


# ---------------------------------------------------------------- adapters loaded and unloaded while serving


def _admin(url: str, method: str, path: str, body: dict | None = None):
    """(status, JSON body) of an adapter route."""
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode() if body else None, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.e2e
def test_adapters_load_and_unload_while_16_clients_stream(adapter_dirs, monkeypatch, tmp_path):
    """16 streams on alpha run while beta is loaded (and used), a broken dir and a missing one are refused, and alpha
    is unloaded: every stream ends with alpha's own text, alpha is then 404 and beta answers as its merged model."""
    engine = load_engine(adapter_dirs[:1], max_tokens=32, device=torch.device("cpu"), max_batch=16, max_queue=32, log=quiet)
    step, seqs, submit = engine.scheduler.step, [], engine.scheduler.submit
    monkeypatch.setattr(engine.scheduler, "step", lambda: (time.sleep(0.02), step())[1])  # 32 tokens: ~1 s a stream
    monkeypatch.setattr(engine.scheduler, "submit", lambda new: (submit(new), seqs.extend(new)))
    expected = {}
    for d in adapter_dirs:
        model, tok = load_for_generation(d)
        expected[d.name] = generate(model, tok, ["The market"], Sampling(max_new_tokens=32))[0][0]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with running(engine, log=quiet) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        texts = [None] * 16

        def stream(k):
            chunks = list(client.completions.create(model="alpha", prompt="The market", max_tokens=32, temperature=0, stream=True))
            texts[k] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        _wait(lambda: engine.scheduler.batch_size == 16)
        assert _admin(srv.url, "POST", "/v1/adapters", {"lora_name": "beta", "lora_path": str(adapter_dirs[1])}) == (
            200, {"id": "beta", "object": "adapter", "deleted": False})
        in_flight = sum(not s.done for s in seqs if s.adapter == "alpha")
        assert _admin(srv.url, "DELETE", "/v1/adapters/alpha")[0] == 200
        status, error = _admin(srv.url, "POST", "/v1/adapters", {"lora_name": "gamma", "lora_path": str(tmp_path / "broken")})
        assert status == 400 and f"{tmp_path / 'broken' / 'adapter_config.json'} is damaged" in error["error"]["message"]
        status, error = _admin(srv.url, "POST", "/v1/adapters", {"lora_name": "gamma", "lora_path": str(tmp_path / "none")})
        assert status == 400 and f"{tmp_path / 'none'} is neither" in error["error"]["message"]
        assert _admin(srv.url, "POST", "/v1/adapters", {"lora_name": "beta", "lora_path": str(adapter_dirs[1])})[0] == 400  # taken
        beta = client.completions.create(model="beta", prompt="The market", max_tokens=32, temperature=0).choices[0].text
        with pytest.raises(openai.NotFoundError, match="model 'alpha' is not served"):
            client.completions.create(model="alpha", prompt="x", max_tokens=4)
        for t in threads:
            t.join(timeout=120)
        assert in_flight > 0 and texts == [(expected["alpha"], "length")] * 16
        assert beta == expected["beta"] != expected["alpha"]
        assert {m.id for m in client.models.list()} == {"beta", "base"} and _admin(srv.url, "DELETE", "/v1/adapters/alpha")[0] == 404
        _wait(lambda: engine.scheduler.adapters.names == ["beta"])


@pytest.mark.e2e
def test_a_folder_of_runs_serves_them_all(adapter_dirs, tmp_path):
    engine = load_engine([adapter_dirs[0].parent], max_tokens=8, device=torch.device("cpu"), log=quiet)
    assert engine.names == ["alpha", "beta", "base"] and engine.scheduler.mixes
    with pytest.raises(LoramixError, match=f"{tmp_path} is not a run dir or adapter dir and holds none"):
        load_engine([tmp_path], max_tokens=8, device=torch.device("cpu"), log=quiet)
