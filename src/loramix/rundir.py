"""The run directory describes itself: config, manifest, metrics, adapter, evaluation, status.

    runs/<name>/
      config.yaml        resolved config (what `eval`, `merge`, `report` rebuild from)
      manifest.json      per-source counts and hashes of the selected example ids
      run.json           status (running / finished / failed), versions, hardware, plan, base fingerprint
      metrics.jsonl      one JSON object per logged event (train / eval)
      adapter/           PEFT adapter: adapter_config.json + adapter_model.safetensors
      eval.json          final validation metrics; written last, so its presence marks a finished run

Every file is written to a temporary name and renamed, so a crash never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import yaml

from loramix.config import Config, config_from_dict
from loramix.errors import LoramixError


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when taken: a second demo never clobbers the first."""
    path, k = root / name, 1
    while path.exists() and any(path.iterdir()):
        k += 1
        path = root / f"{name}-{k}"
    return path


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Create an empty run dir; refuse to mix into an existing run unless told to replace it."""
    if path.exists() and not path.is_dir():
        raise LoramixError(f"run dir {path} is a file; pick another --run-dir")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise LoramixError(f"run dir {path} already holds a run; pick another --run-dir or pass --overwrite to replace it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoramixError(f"cannot create run dir {path} ({e.strerror}); pick a writable --run-dir") from e
    return path


def save_config(path: Path, cfg: Config) -> None:
    write_atomic(path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def load_run_config(run_dir: Path) -> Config:
    """The config a run was trained with; names what is missing if the dir is not a run."""
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise LoramixError(f"{run_dir} is not a loramix run dir (no config.yaml); pass the --run-dir of a `loramix train` run")
    return config_from_dict(yaml.safe_load(cfg_path.read_text(encoding="utf-8")))


def environment() -> dict:
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def save_adapter(model, run_dir: Path) -> Path:
    """PEFT's own save_pretrained into a temp dir, then one rename: the adapter dir is whole or absent."""
    final = run_dir / "adapter"
    tmp = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
