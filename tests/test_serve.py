"""The server with the official `openai` client on loopback: two adapters, streaming, threads, bad requests."""

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from loramix.artifacts import load_for_generation
from loramix.config import load_config
from loramix.generation import Sampling, generate
from loramix.serve import load_engine, make_handler
from loramix.training import train

from conftest import ROOT, TINY

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir, tiny_run):
    import shutil
    from http.server import ThreadingHTTPServer

    root = tmp_path_factory.mktemp("serve")
    dirs = [Path(shutil.copytree(tiny_run.run_dir, root / "alpha"))]  # adapters are named by their dirs
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache_dir}", "train.seed=1"])
    dirs.append(train(cfg, root / "beta", log=lambda *a: None).run_dir)
    # A tiny random model's greedy text hardly depends on a few steps of LoRA: make beta's adapter strong,
    # so that routing a request to the wrong adapter changes the text.
    from safetensors.torch import load_file, save_file

    path = dirs[1] / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 200 if "lora_B" in k else v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    engine = load_engine(dirs, max_tokens=32, device=torch.device("cpu"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(engine, log=lambda *a: None))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    expected = {}
    for d in dirs:
        model, tok = load_for_generation(d)
        for prompt in ("Once upon a time", "The market"):
            expected[d.name, prompt] = generate(model, tok, [prompt], Sampling(max_new_tokens=8))[0][0]
    yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0), url, expected
    httpd.shutdown()


def test_completions_per_adapter(server):
    client, _, expected = server
    for name in ("alpha", "beta"):
        r = client.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert r.choices[0].text == expected[name, "Once upon a time"]
        assert r.model == name and r.usage.prompt_tokens == 4 and r.choices[0].finish_reason in ("length", "stop")
    assert expected["alpha", "Once upon a time"] != expected["beta", "Once upon a time"]
    assert {m.id for m in client.models.list()} == {"alpha", "beta", "base"}


def test_streaming_equals_non_streaming(server):
    client, _, expected = server
    chunks = list(client.completions.create(model="beta", prompt="The market", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected["beta", "The market"]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_requests_never_mix(server):
    client, _, expected = server
    jobs = [(name, prompt) for name in ("alpha", "beta") for prompt in ("Once upon a time", "The market")] * 2
    results = [None] * len(jobs)

    def ask(k, name, prompt):
        results[k] = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(k, *job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected[job] for job in jobs]


def test_bad_requests_get_4xx_with_a_message(server):
    client, url, _ = server
    with pytest.raises(openai.NotFoundError, match="model 'gamma' is not served"):
        client.completions.create(model="gamma", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be an integer in \[1, 32\]"):
        client.completions.create(model="alpha", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        client.completions.create(model="alpha", prompt="x", max_tokens=4, extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="exceeds the context window"):
        client.completions.create(model="alpha", prompt="word " * 1020, max_tokens=8)
    request = urllib.request.Request(f"{url}/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as r:
        assert json.loads(r.read()) == {"status": "ok"}
