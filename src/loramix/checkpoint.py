"""Checkpoints that survive a kill at any instant, and an exact resume from them.

    checkpoints/step-000120/
      trainable.safetensors   every trainable (LoRA) tensor, by parameter name
      optimizer.pt            AdamW state (loaded with torch.load(weights_only=True): tensors and numbers only)
      rng.safetensors         every process's torch CPU and CUDA generator states
      state.json              step, counters, log accumulators, grad-scaler state, Python and NumPy RNG
                              states, config and base fingerprints, metrics.jsonl length at this step
      checksums.json          sha256 of each file above; written last

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place, so a
crash leaves the old set of checkpoints or the new one, never a torn one; a damaged file is caught by
its checksum on load and that checkpoint is skipped for the previous one. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loramix.errors import LoramixError
from loramix.files import replacing, stale_siblings
from loramix.records import Fingerprints

_FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "state.json")


@dataclass
class TrainState:
    """Everything besides tensors that the loop needs to continue exactly where it stopped."""

    step: int = 0
    docs_seen: int = 0
    tokens_seen: int = 0
    log_nll: float = 0.0  # NLL and targets since the last logged row
    log_tokens: int = 0
    log_by_source: list[list[float]] = field(default_factory=list)  # [NLL per source, targets per source] since then
    elapsed: float = 0.0
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    bad_streak: int = 0
    eval_batch: int | None = None
    val_loss: float | None = None  # of the evaluation at this step, if one ran
    metrics_bytes: int = 0
    mix: dict = field(default_factory=dict)  # data.mix.strategy=adaptive: weights, segments taken per source, running losses, interval sums


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def local_rng_state() -> dict[str, torch.Tensor]:
    """This process's torch generators (CPU, and its current GPU)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def save_checkpoint(run_dir: Path, state: TrainState, model, optimizer, scaler, fingerprints: Fingerprints, keep: int,
                    rng_states: list[dict[str, torch.Tensor]]) -> Path:
    """Write step `state.step` atomically, then prune to the newest `keep` plus the best by val loss.

    `rng_states` holds every process's `local_rng_state()`, in rank order (torchrun: rank 0 writes).

    Raises:
        LoramixError: the disk is full or the run dir unwritable; earlier checkpoints stay intact.
    """
    root = checkpoints_dir(run_dir)
    final = root / f"step-{state.step:07d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with replacing(final) as tmp:  # the same step saved again after a resume is replaced whole
            tmp.mkdir()
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            save_file({f"{k}_{rank}": v for rank, st in enumerate(rng_states) for k, v in st.items()}, tmp / "rng.safetensors")
            extra = {"scaler": scaler.state_dict(), "python_rng": _py_rng(), "numpy_rng": _np_rng(), "world_size": len(rng_states), **fingerprints.to_dict()}
            (tmp / "state.json").write_text(json.dumps({**asdict(state), **extra}, indent=1))
            (tmp / "checksums.json").write_text(json.dumps({f: _sha256(tmp / f) for f in _FILES}, indent=1))
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as RuntimeError
        previous = latest_names(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise LoramixError(f"cannot write checkpoint {final} ({getattr(e, 'strerror', None) or e}); free disk space or fix permissions, then resume with "
                           f"--resume; {kept}") from e
    _prune(root, keep)
    return final


def latest_names(run_dir: Path) -> list[str]:
    root = checkpoints_dir(run_dir)
    return sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _prune(root: Path, keep: int) -> None:
    names = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    best = best_checkpoint(root.parent)
    for name in names[:-keep]:
        if best is None or name != best[0]:
            shutil.rmtree(root / name, ignore_errors=True)


def best_checkpoint(run_dir: Path) -> tuple[str, float] | None:
    """(name, val loss) of the checkpoint with the lowest validation loss, among those evaluated."""
    scored = []
    for name in latest_names(run_dir):
        try:
            loss = json.loads((checkpoints_dir(run_dir) / name / "state.json").read_text())["val_loss"]
        except (OSError, ValueError, KeyError):
            continue
        if loss is not None:
            scored.append((loss, name))
    return (min(scored)[1], min(scored)[0]) if scored else None


def find_resumable(run_dir: Path, log=print) -> Path | None:
    """The newest checkpoint whose files all match their checksums; damaged ones are reported and skipped."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    for stale in stale_siblings(root):  # a save that was killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    for name in reversed(latest_names(run_dir)):
        problem = verify(root / name)
        if problem is None:
            return root / name
        log(f"warning: checkpoint {name} is damaged ({problem}); skipping it for the previous one")
    return None


def verify(path: Path) -> str | None:
    """None if every file matches checksums.json, else what is wrong."""
    try:
        sums = json.loads((path / "checksums.json").read_text())
    except (OSError, ValueError):
        return "checksums.json missing or unreadable"
    for f in _FILES:
        if not (path / f).is_file():
            return f"{f} missing"
        if _sha256(path / f) != sums.get(f):
            return f"{f} checksum mismatch"
    return None


def load_checkpoint(path: Path, model, optimizer, scaler, fingerprints: Fingerprints, rank: int = 0, world: int = 1, log=print) -> TrainState:
    """Restore weights, optimizer, scaler and every RNG from a verified checkpoint.

    With the process count it was written with, each process gets its own generator state back (an exact
    resume); with another count the weights and optimizer still continue exactly, and each process's
    dropout stream is reseeded from the step (the run is then no longer bit-identical to an uninterrupted one).

    Raises:
        LoramixError: a checkpoint of another base model or LoRA shape, naming the difference.
    """
    raw = json.loads((path / "state.json").read_text())
    for key, value in fingerprints.to_dict().items():
        if raw.get(key) != value:
            what = "base model weights" if key == "base_fingerprint" else "config"
            raise LoramixError(f"checkpoint {path} was made with different {what} ({key} {raw.get(key)} != {value}); resume with the run's own config and "
                               "base model")
    saved = load_file(path / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        extra, missing = sorted(saved.keys() - params.keys()), sorted(params.keys() - saved.keys())
        raise LoramixError(f"checkpoint {path} does not fit this model: it has {extra[:3]} the model lacks, lacks {missing[:3]}; resume with the run's own "
                           "model and lora settings")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise LoramixError(f"checkpoint {path} does not fit this model: {name} is {tuple(saved[name].shape)} there, {tuple(p.shape)} here; resume with "
                               "the run's own lora.r and model size")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    try:
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise LoramixError(f"checkpoint {path}/optimizer.pt holds more than tensors and numbers ({type(e).__name__}); it was not loaded, delete that "
                           "checkpoint") from e
    optimizer.load_state_dict(optim_state)
    scaler.load_state_dict(raw.pop("scaler"))
    rng = load_file(path / "rng.safetensors")
    if raw.pop("world_size") == world:
        torch.set_rng_state(rng[f"torch_cpu_{rank}"])
        if torch.cuda.is_available() and f"torch_cuda_{rank}" in rng:
            torch.cuda.set_rng_state(rng[f"torch_cuda_{rank}"])
    else:
        torch.manual_seed(1_000_003 * raw["step"] + rank)
        if rank == 0:
            log(f"note: {path.name} was written by another number of processes; dropout streams reseeded, so this run "
                "continues exactly in weights and data order but not bit for bit")
    py = raw.pop("python_rng")
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = raw.pop("numpy_rng")
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
    return TrainState(**{k: raw[k] for k in TrainState.__dataclass_fields__ if k in raw})  # a field added later keeps its default


def _py_rng() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _np_rng() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

