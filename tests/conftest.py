"""Shared fixtures: offline Hugging Face libraries, a private cache, a tiny GPT-2 config."""

import os

# Tests never touch the network: the Hub libraries fail fast instead of retrying for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from loramix.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"


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
