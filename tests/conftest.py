"""Shared fixtures: offline Hugging Face libraries, a private cache, a tiny GPT-2 config, the one tiny run
that every test reading a finished run shares, and helpers the test modules have in common.

Tiers (markers on each test, `pytest -m unit` etc.): unit, e2e, parity, real; gpu (skipped without CUDA) on top."""

import os

# Tests never touch the network: the Hub libraries fail fast instead of retrying for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from loramix.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"
CRASHING = str(ROOT / "tests" / "crashing.py")  # `loramix` that dies at LORAMIX_CRASH_AT (tests/crashing.py)


TIERS = ("unit", "e2e", "parity", "real")


def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one tier, marked on the test itself (so `-m unit` finds the unit tests of
    every module); tests marked gpu skip on a machine without CUDA (CI), and run where one is."""
    import torch

    wrong = [item.nodeid for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if wrong:
        raise pytest.UsageError(f"mark each test with exactly one of {', '.join(TIERS)}: {', '.join(wrong[:5])}")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("loramix-cache"))


TINY = [
    "model.init=random", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
    "data.local_dir=@demo", "data.cap=24", "data.seq_len=64",
    "train.epochs=1", "train.micro_batch=4", "train.grad_accum=2", "train.lr=1e-2",
    "train.warmup_steps=2", "train.log_every=2", "train.eval_every=4", "eval.batch_size=8",
]


@pytest.fixture
def tiny_overrides(cache_dir) -> list[str]:
    """Overrides that turn any preset into a seconds-long run on generated data."""
    return TINY + [f"data.cache_dir={cache_dir}"]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    return load_config(ROOT / "configs" / "demo.yaml", tiny_overrides)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir):
    """A finished tiny run (demo preset + TINY), trained once per session through the Python API; tests only read it."""
    import loramix

    cfg = loramix.load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache_dir}"])
    return loramix.train(cfg, tmp_path_factory.mktemp("shared") / "tiny", log=lambda *a: None, progress=False)


def tiny_lora_model(seq_len: int = 64, seed: int = 0, *overrides: str):
    """A 2-layer width-32 random GPT-2 with fresh LoRA, in eval mode (GPT-2's own dropout off; gradients still flow)."""
    from loramix.model import attach_lora, load_base_model

    cfg = load_config(None, ["model.init=random", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", *overrides])
    return attach_lora(load_base_model(cfg.model, seq_len), cfg.lora, seed).eval()


TIMING = {"elapsed_s", "tokens_per_s", "samples_per_s", "eval_tokens_per_s"}


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which differ between identical runs."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
