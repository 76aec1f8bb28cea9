"""Tiny random-init model dirs of every supported family, built offline: a config.json from the family's
own `transformers` config class (2 layers, width 32, short sliding windows where the family has them)
and a small tokenizer of the family's kind, trained here with the `tokenizers` library on generated
text: SentencePiece-style BPE with byte fallback and a BOS (Llama, Mistral, Gemma, Phi-3), byte-level
BPE (Qwen, GPT-NeoX; OPT's adds a BOS). GPT-2 uses its real vocabulary."""

from __future__ import annotations

import functools
import random
from pathlib import Path

WINDOW = 16  # sliding window, shorter than the test documents: packing must carry it
VOCAB = 512
_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": VOCAB, "max_position_embeddings": 256}
_SP = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}

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
