"""The serving engine's fast paths against the stock ones: oneDNN-packed linear layers against MKL's,
the chunked greedy and top-k against torch's argmax and topk (ties, a maximum in the last partial chunk),
and text decoded a few tokens at a time against decoding them all."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loramix.config import load_config
from loramix.model import base_fingerprint, load_base_model, unwrap
from loramix.serve import sampler
from loramix.serve.detokenizer import Detokenizer
from loramix.serve.packed import pack_linears


def tiny_gpt2():
    cfg = load_config(None, ["model.init=random", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"])
    return load_base_model(cfg.model, 64).eval()


@pytest.mark.unit
def test_the_packed_head_gives_the_stock_logits_and_keeps_the_weights():
    model = tiny_gpt2()
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole, last = model(input_ids=ids).logits, model(input_ids=ids, logits_to_keep=1).logits
    fingerprint, keys = base_fingerprint(model), set(model.state_dict())
    assert pack_linears(model) == 1  # the head (1.6M weights); the body's layers are too small to gain
    assert type(model.lm_head).__name__ == "_Packed" and type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=1).logits, last, atol=1e-5, rtol=0)  # a strided (B, 1, d) slice
        # one row runs on the head's (in, out) copy, two on the packed one: zeroing the packed weights shows which ran
        model.lm_head.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(model.lm_head.weight), 16)
        torch.testing.assert_close(model(input_ids=ids[1:2], logits_to_keep=1).logits, last[1:2], atol=1e-5, rtol=0)
        assert not model(input_ids=ids[:2], logits_to_keep=1).logits.any()
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert set(model.state_dict()) == keys and base_fingerprint(model) == fingerprint


@pytest.mark.unit
@pytest.mark.parametrize("dora", [False, True])
def test_packed_base_layers_under_lora_give_the_same_logits(dora):
    """A Llama-shaped layer, LoRA (or DoRA) on attention and MLP: PEFT's base layers are packed, LoRA's own layers
    are not; the logits stay, for one token (MKL below a layer's threshold of rows) and for many (packed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"], use_dora=dora,
                                                                init_lora_weights=False)).eval()
    batches = [torch.randint(0, 1000, (2, 9)), torch.randint(0, 1000, (1, 1))]
    with torch.inference_mode():
        before = [model(input_ids=ids).logits for ids in batches]
    assert pack_linears(model) == 8  # gate, up, down (1M weights: packed from 1 row); q, k, v, o and the head (512K, 262K: from 2)
    mlp, attention = unwrap(model).model.layers[0].mlp, unwrap(model).model.layers[0].self_attn
    assert type(mlp.up_proj.base_layer).__name__ == "_Packed" and type(mlp.up_proj.lora_A["default"]) is torch.nn.Linear
    assert type(mlp.gate_proj).__name__ == "_Packed" and type(attention.q_proj.base_layer).__name__ == "_Packed"
    assert (mlp.gate_proj.packed_from, attention.k_proj.packed_from) == (1, 2)
    calls = []
    for layer in (mlp.gate_proj, attention.k_proj):  # which kernel ran: the packed one, or the layer's own (MKL)
        layer.original.register_forward_hook(lambda m, args, out: calls.append(("own", args[0].shape[:-1].numel())))
    with torch.inference_mode():
        for ids, logits in zip(batches, before):
            torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=0)
    assert calls == [("own", 1)]  # k_proj for the single token; gate_proj is packed from one row


@pytest.mark.unit
def test_layers_it_cannot_pack_are_left_alone():
    half = tiny_gpt2().to(torch.bfloat16)
    assert pack_linears(half) == 0 and type(half.lm_head) is torch.nn.Linear


@pytest.mark.unit
@pytest.mark.parametrize("vocab", [50257, 1000, 128, 129, 64])
def test_chunked_greedy_and_top_k_equal_argmax_and_topk(vocab):
    gen = torch.Generator().manual_seed(vocab)
    for trial in range(12):
        logits = torch.randn(6, vocab, generator=gen) * 3
        if trial % 3 == 0:
            logits[:, -1] = 50.0  # the maximum in the last, partial, chunk
        if trial % 4 == 0:
            logits = logits.round()  # many ties: argmax takes the first; topk's order among ties is its own
        maxima = sampler._chunk_maxima(logits)
        assert torch.equal(sampler._greedy(logits, maxima), logits.argmax(-1))
        rows = [0, 3, 5]
        for k in (1, 5, 50):
            if k <= vocab:
                (ours, values), theirs = sampler._top(logits, maxima, rows, k), logits[rows].topk(k).indices
                sub = logits[rows]
                assert torch.equal(values, sub.gather(1, ours))
                # the same values; the same ids where no value ties at the k-th place
                assert torch.equal(sub.gather(1, ours).sort(-1).values, sub.gather(1, theirs).sort(-1).values)
                if trial % 4:
                    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["gpt2", "sentencepiece", "bytelevel", "opt"])
def test_text_decoded_a_few_tokens_at_a_time_equals_decoding_them_all(kind):
    """After every token: accents, emoji split over byte tokens, SentencePiece's leading spaces, random ids."""
    from tiny_families import hf_tokenizer, sample_texts

    from loramix.model import load_tokenizer

    tok = load_tokenizer(load_config(None, []).model) if kind == "gpt2" else hf_tokenizer(kind)
    gen = torch.Generator().manual_seed(0)
    cases = [tok(t, add_special_tokens=False)["input_ids"] for t in sample_texts(40)]
    cases += [torch.randint(0, len(tok), (40,), generator=gen).tolist() for _ in range(40)]
    for ids in cases:
        text, tokens = Detokenizer(tok), []
        for token in ids:
            tokens.append(token)
            assert text.update(tokens) == tok.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert text.read_at > 0  # it did decode a few at a time
