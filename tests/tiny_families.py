"""Tiny random-init model dirs of every family CI proves (the README's table), built offline: a config.json from the family's
own `transformers` config class (2 layers, width 32, short sliding windows where the family has them)
and a small tokenizer of the family's kind, trained here with the `tokenizers` library on generated
text: SentencePiece-style BPE with byte fallback and a BOS (Llama, Mistral, Gemma, Phi-3), byte-level
BPE (Qwen, GPT-NeoX; OPT's adds a BOS). GPT-2 uses its real vocabulary."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

WINDOW = 16  # sliding window, shorter than the test documents: packing must carry it
VOCAB = 512
_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": VOCAB, "max_position_embeddings": 256}
_SP = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}  # SentencePiece-style ids
_BL = {"bos_token_id": 0, "eos_token_id": 0}  # byte-level BPE's <|endoftext|>

# model_type -> (config class name, its settings, tokenizer kind)
FAMILY_CONFIGS = {
    "gpt2": ("GPT2Config", {"n_layer": 2, "n_embd": 32, "n_head": 2}, "gpt2"),
    "llama": ("LlamaConfig", {**_SIZES, **_SP, "tie_word_embeddings": False}, "sentencepiece"),
    "mistral": ("MistralConfig", {**_SIZES, **_SP, "sliding_window": WINDOW}, "sentencepiece"),
    "qwen2": ("Qwen2Config", {**_SIZES, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
                              "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": True}, "bytelevel"),
    "qwen3": ("Qwen3Config", {**_SIZES, "head_dim": 16, "bos_token_id": 0, "eos_token_id": 0}, "bytelevel"),
    "gemma2": ("Gemma2Config", {**_SIZES, **_SP, "head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                                "final_logit_softcapping": 5.0, "attn_logit_softcapping": 50.0}, "sentencepiece"),
    "gemma3_text": ("Gemma3TextConfig", {**_SIZES, **_SP, "head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                                         "layer_types": ["sliding_attention", "full_attention"]}, "sentencepiece"),
    "phi3": ("Phi3Config", {**_SIZES, **_SP, "sliding_window": WINDOW}, "sentencepiece"),
    "gpt_neox": ("GPTNeoXConfig", {**_SIZES, "rotary_pct": 0.25, "bos_token_id": 0, "eos_token_id": 0}, "bytelevel"),
    "opt": ("OPTConfig", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB,
                          "word_embed_proj_dim": 32, "max_position_embeddings": 256, "bos_token_id": 2, "eos_token_id": 2,
                          "pad_token_id": 1}, "opt"),
    "falcon": ("FalconConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB, **_BL}, "bytelevel"),
    "stablelm": ("StableLmConfig", {**_SIZES, **_BL}, "bytelevel"),
    "olmo2": ("Olmo2Config", {**_SIZES, **_BL, "pad_token_id": None}, "bytelevel"),
    # Granite and Cohere scale their logits; Granite also its embeddings, residuals and attention scores.
    "granite": ("GraniteConfig", {**_SIZES, **_BL, "logits_scaling": 2.0, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.25}, "bytelevel"),
    "cohere": ("CohereConfig", {**_SIZES, **_BL, "pad_token_id": None, "logit_scale": 0.5}, "bytelevel"),
    "phi": ("PhiConfig", {**_SIZES, **_BL, "partial_rotary_factor": 0.5}, "bytelevel"),  # its LM head has a bias
    "starcoder2": ("Starcoder2Config", {**_SIZES, **_BL, "sliding_window": WINDOW}, "bytelevel"),
    "gpt_bigcode": ("GPTBigCodeConfig", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "vocab_size": VOCAB, **_BL}, "bytelevel"),
    "gptj": ("GPTJConfig", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "vocab_size": VOCAB, "rotary_dim": 4, **_BL}, "bytelevel"),
    "mixtral": ("MixtralConfig", {**_SIZES, **_SP, "num_local_experts": 4, "num_experts_per_tok": 2}, "sentencepiece"),
    "smollm3": ("SmolLM3Config", {**_SIZES, **_BL, "pad_token_id": None}, "bytelevel"),
    "gemma": ("GemmaConfig", {**_SIZES, **_SP, "head_dim": 8}, "sentencepiece"),
}


@dataclass(frozen=True)
class Family:
    """A model type CI proves on a tiny model (tests/test_families.py): the README's family table."""

    name: str  # as the README's table names it
    example: str  # a Hub id of the family


FAMILIES = {
    "gpt2": Family("GPT-2", "gpt2"),
    "llama": Family("Llama (SmolLM, TinyLlama, Llama 3)", "HuggingFaceTB/SmolLM2-135M"),
    "mistral": Family("Mistral", "mistralai/Mistral-7B-v0.3"),
    "qwen2": Family("Qwen2", "Qwen/Qwen2.5-0.5B"),
    "qwen3": Family("Qwen3", "Qwen/Qwen3-0.6B"),
    "gemma2": Family("Gemma 2", "google/gemma-2-2b"),
    "gemma3_text": Family("Gemma 3", "google/gemma-3-270m"),
    "phi3": Family("Phi-3", "microsoft/Phi-3-mini-4k-instruct"),
    "gpt_neox": Family("GPT-NeoX (Pythia)", "EleutherAI/pythia-70m"),
    "opt": Family("OPT", "facebook/opt-125m"),
    "falcon": Family("Falcon", "tiiuae/falcon-rw-1b"),
    "stablelm": Family("StableLM", "stabilityai/stablelm-2-1_6b"),
    "olmo2": Family("OLMo 2", "allenai/OLMo-2-0425-1B"),
    "granite": Family("Granite", "ibm-granite/granite-3.3-2b-base"),
    "cohere": Family("Cohere (Command R)", "CohereForAI/c4ai-command-r-v01"),
    "phi": Family("Phi-1/2", "microsoft/phi-2"),
    "starcoder2": Family("StarCoder2", "bigcode/starcoder2-3b"),
    "gpt_bigcode": Family("GPTBigCode (SantaCoder, StarCoder)", "bigcode/tiny_starcoder_py"),
    "gptj": Family("GPT-J", "EleutherAI/gpt-j-6b"),
    "mixtral": Family("Mixtral (mixture of experts)", "mistralai/Mixtral-8x7B-v0.1"),
    "smollm3": Family("SmolLM3", "HuggingFaceTB/SmolLM3-3B"),
    "gemma": Family("Gemma", "google/gemma-2b"),
}


def sample_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Generated English-like text with accents and emoji, so byte fallback and multi-byte characters occur."""
    r = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "café", "naïve", "story", "market", "rose", "fell", "river", "über",
             "said", "officials", "after", "rain", "\u2014", "\U0001F600", "new", "plan", "day"]
    return [" ".join(r.choice(words) for _ in range(r.randint(5, 40))) + r.choice([".", "!", "?"]) for _ in range(n)]


@functools.cache
def tokenizer_object(kind: str):
    """A trained `tokenizers.Tokenizer` of the given kind (cached: training takes a fraction of a second)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "sentencepiece":
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials + alphabet)
        bos = "<s>"
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>"] if kind == "opt" else ["<|endoftext|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bos = "</s>" if kind == "opt" else None
    tok.train_from_iterator(sample_texts(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def hf_tokenizer(kind: str):
    """The kind's tokenizer as transformers loads it (no pad token, as most base models ship)."""
    from transformers import PreTrainedTokenizerFast

    names = {"sentencepiece": ("<s>", "</s>", "<unk>"), "opt": ("</s>", "</s>", "<unk>"), "bytelevel": (None, "<|endoftext|>", None)}[kind]
    bos, eos, unk = names
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object(kind), bos_token=bos, eos_token=eos, unk_token=unk)


def family_dir(root: Path, model_type: str) -> Path:
    """`root/<model_type>`: config.json (+ tokenizer files, except for GPT-2, which loramix brings)."""
    import transformers

    cls_name, settings, kind = FAMILY_CONFIGS[model_type]
    path = Path(root) / model_type
    if not (path / "config.json").is_file():
        getattr(transformers, cls_name)(**settings).save_pretrained(str(path))
        if kind != "gpt2":
            hf_tokenizer(kind).save_pretrained(str(path))
    return path
