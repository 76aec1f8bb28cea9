"""`loramix generate`: deterministic for a seed, greedy equals the merged model's argmax, batches, stop strings."""

import subprocess
import sys

import pytest
import torch

from loramix.artifacts import load_for_generation
from loramix.cli import main
from loramix.generation import generate
from loramix.serve.sampler import Sampling


@pytest.fixture
def run_dir(tiny_run):
    return tiny_run.run_dir


@pytest.mark.e2e
def test_sampling_is_deterministic_for_a_seed(run_dir):
    model, tok = load_for_generation(run_dir)
    s = Sampling(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a, _ = generate(model, tok, ["Once upon a time"], s)
    b, _ = generate(model, tok, ["Once upon a time"], s)
    c, _ = generate(model, tok, ["Once upon a time"], Sampling(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=8))
    assert a == b and a != c and len(tok(a[0])["input_ids"]) >= 1


@pytest.mark.e2e
def test_greedy_follows_the_argmax(run_dir):
    model, tok = load_for_generation(run_dir)
    (text,), rate = generate(model, tok, ["The market"], Sampling(max_new_tokens=5))
    ids = tok("The market", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert text == tok.decode(ids[0, 2:], skip_special_tokens=True) and rate > 0


@pytest.mark.e2e
def test_batched_prompts_match_single_prompts(run_dir):
    model, tok = load_for_generation(run_dir)
    s = Sampling(max_new_tokens=6)
    batch, _ = generate(model, tok, ["A short one", "A much longer prompt than the first one"], s)
    assert batch == [generate(model, tok, [p], s)[0][0] for p in ["A short one", "A much longer prompt than the first one"]]


@pytest.mark.e2e
def test_stop_strings_cut_the_text():
    from loramix.serve.detokenizer import cut_at_stop

    assert cut_at_stop("one two. three", (".",)) == "one two" and cut_at_stop("abc", ("x",)) == "abc"


@pytest.mark.e2e
def test_cli_streams_and_reports_tokens_per_second(run_dir):
    proc = subprocess.run([sys.executable, "-m", "loramix", "generate", str(run_dir), "--prompt", "Hello", "--max-new-tokens", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s]" in proc.stderr and proc.stdout.strip()


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "x", "--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "exceeds the model's 1024 positions"),
    (["--prompts-file", "/no/such/file"], "prompts file /no/such/file does not exist"),
])
@pytest.mark.e2e
def test_bad_generation_input(run_dir, capsys, argv, message):
    assert main(["generate", str(run_dir), *argv]) == 2
    assert message in capsys.readouterr().err
