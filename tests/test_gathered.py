"""The gathered LoRA pass against stock PEFT: adapters of different ranks, alphas and targets, rsLoRA, DoRA and
rank patterns in one batch, on nn.Linear (Llama) and Conv1D (GPT-2) layers; adapters added and removed between
steps; adapters it cannot batch refused with a message."""

import contextlib
import gc
import weakref

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_families import hf_tokenizer

from loramix.errors import LoramixError
from loramix.serve.lora import BASE, Adapters, Route
from loramix.serve.packed import pack_linears
from loramix.serve.sampler import Sampling
from loramix.serve.scheduler import Scheduler, Sequence

LLAMA = {  # name -> PEFT config: every rank, alpha and target set differs
    "q4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]),  # the head too: it runs once a step, on all rows
    "all8rs": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "dora2": dict(r=2, lora_alpha=3, use_dora=True, target_modules=["q_proj", "o_proj", "down_proj"]),
    "pattern": dict(r=6, lora_alpha=6, target_modules=["k_proj", "up_proj"], rank_pattern={"up_proj": 3}, alpha_pattern={"k_proj": 12}),
}
GPT2 = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
}


def _base(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=320, max_position_embeddings=128)
        return LlamaForCausalLM(config).eval()
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=320, n_positions=128)).eval()


def _adapter(kind: str, name: str, spec: dict, root):
    """A saved PEFT adapter with random B (and DoRA magnitudes off the norm), so that every one changes the logits."""
    model = get_peft_model(_base(kind), LoraConfig(**spec), adapter_name=name)
    gen = torch.Generator().manual_seed(len(name))
    for pname, p in model.named_parameters():
        if "lora_B" in pname or "lora_magnitude" in pname:
            p.data += torch.randn(p.shape, generator=gen) * 0.3
    model.save_pretrained(root)
    return root / name if (root / name).is_dir() else root


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def adapters(request, tmp_path_factory):
    kind, specs = request.param, LLAMA if request.param == "llama" else GPT2
    root = tmp_path_factory.mktemp(kind)
    dirs = {name: _adapter(kind, name, spec, root / name) for name, spec in specs.items()}
    return kind, dirs


def _stock(kind: str, dirs: dict):
    names = list(dirs)
    model = PeftModel.from_pretrained(_base(kind), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    return model.eval()


def _alone(stock, adapter: str, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), stock.disable_adapter() if adapter == BASE else contextlib.nullcontext():
        if adapter != BASE:
            stock.set_adapter(adapter)
        return stock(input_ids=torch.tensor([ids])).logits[0]


def _run(scheduler: Scheduler, seqs: list[Sequence], between=None, later: tuple[Sequence, ...] = ()) -> dict:
    """Every sequence's logits step by step (`later` ones are submitted by `between(k)`, which runs before step k)."""
    seen = {s: [] for s in [*seqs, *later]}
    scheduler.submit(seqs)
    for k in range(40):
        if between:
            between(k)
        for seq, logits in scheduler.step().items():
            seen[seq].append(logits)
    assert all(s.done for s in seen)
    return seen


def _check(stock, seen: dict) -> None:
    for seq, logits in seen.items():
        alone = _alone(stock, seq.adapter, seq.prompt + seq.tokens[:-1])[len(seq.prompt) - 1 :]
        torch.testing.assert_close(torch.stack(logits), alone, atol=1e-4, rtol=0)


def _seqs(names: list[str], tokens: int = 6) -> list[Sequence]:
    gen = torch.Generator().manual_seed(1)
    return [Sequence(torch.randint(1, 320, (2 + 3 * k % 7,), generator=gen).tolist(), name, Sampling(max_new_tokens=tokens), lambda e: None, k)
            for k, name in enumerate(names)]


@pytest.mark.parity
@pytest.mark.parametrize("grouped_above", [48, 0], ids=["side-by-side", "grouped"])
def test_every_row_gets_its_adapters_logits_in_one_batch(adapters, grouped_above, monkeypatch):
    """Both decode kernels of a mixed batch: the adapters' A and B side by side (these few ranks), and grouped by
    adapter. Rows join the running batch twice, first with adapters it lacks (two rows of one: a run of two in
    their prefill, sorted together), then on two of its adapters."""
    monkeypatch.setattr("loramix.serve.lora._GROUPED_ABOVE", grouped_above)
    kind, dirs = adapters
    stock, served = _stock(kind, dirs), Adapters(_stock(kind, dirs))
    assert served.mixes and sorted(served.names) == sorted(dirs)
    names, half = list(dirs), len(dirs) // 2
    groups = [[*names[:half], BASE], [names[-1], *names[half:], names[0], BASE], [names[0], names[-1]]]
    seqs, scheduler = _seqs([n for g in groups for n in g]), Scheduler(served, hf_tokenizer("bytelevel"), max_batch=16)
    first, later, last = seqs[: len(groups[0])], seqs[len(groups[0]) : -len(groups[2])], seqs[-len(groups[2]) :]
    seen = _run(scheduler, first, lambda k: scheduler.submit({2: later, 4: last}.get(k, [])), [*later, *last])
    assert {len(v) for v in seen.values()} == {6}
    _check(stock, seen)
    for seq in seen:  # greedy alone through stock PEFT: the same tokens
        ids = list(seq.prompt)
        for _ in range(6):
            ids.append(int(_alone(stock, seq.adapter, ids)[-1].argmax()))
        assert ids[len(seq.prompt) :] == seq.tokens
    assert len({tuple(s.tokens) for s in seen if s.adapter != BASE}) > 1


@pytest.mark.parity
def test_adapters_come_and_go_between_steps(adapters, tmp_path):
    """Rows of the first adapter run on while a second is added, used and removed; a bad dir is refused and the
    batch goes on; a removed adapter's name can be loaded again."""
    kind, dirs = adapters
    names = list(dirs)
    stock = _stock(kind, dirs)
    served = Adapters(PeftModel.from_pretrained(_base(kind), str(dirs[names[0]]), adapter_name=names[0]).eval())
    pack_linears(served.peft)
    scheduler = Scheduler(served, hf_tokenizer("bytelevel"), max_batch=16)
    first, later = _seqs([names[0], BASE, names[0]], tokens=12), _seqs([names[1], names[0]], tokens=5)
    (tmp_path / "adapter_config.json").write_text("{not json")
    errors = []

    def between(k):
        if k == 3:
            served.add(names[1], dirs[names[1]])
            scheduler.submit(later)
        if k == 5:
            with pytest.raises(LoramixError, match="cannot load the adapter in") as e:
                served.add("broken", tmp_path)
            errors.append(str(e.value))
        if k == 9:
            scheduler.retire(names[1])  # its rows left after 5 tokens

    seen = _run(scheduler, first, between, later)
    assert served.names == [names[0]] and "\n" not in errors[0]
    _check(stock, seen)
    served.add(names[1], dirs[names[1]])  # the name is free again
    _check(stock, _run(scheduler, _seqs([names[1], names[0]])))
    for name in names[:2]:  # none left, then one again
        scheduler.retire(name)
    assert served.names == []
    served.add(names[0], dirs[names[0]])
    _check(stock, _run(scheduler, _seqs([BASE, names[0]])))
    assert list(served.peft.peft_config) == [f"{names[0]}#4"]


@pytest.mark.unit
def test_a_stack_no_longer_kept_is_freed_at_once(adapters, monkeypatch):
    """Batches over ever new sets of adapters: a layer holds the stacks of the last few only, without waiting for
    the garbage collector (at SmolLM2's shape, stacks held in reference cycles grew the server by ~200 MB a benchmark
    level and every new one's pages faulted)."""
    monkeypatch.setattr("loramix.serve.lora._PLANS_KEPT", 2)
    kind, dirs = adapters
    served = Adapters(_stock(kind, dirs))
    layer = max(served._layers.values(), key=lambda layer: len(layer.rows))
    sets = [[slot] for slot in layer.rows] + [list(layer.rows)[:2]]  # none holds another's adapters
    gc.disable()
    try:
        stacks = [weakref.ref(layer.stack(layer.plan(Route(slots))).a) for slots in sets]
        assert [ref() is not None for ref in stacks] == [False] * (len(sets) - 2) + [True, True]
    finally:
        gc.enable()


@pytest.mark.unit
def test_adapters_it_cannot_batch_are_refused_naming_why(tmp_path):
    model = get_peft_model(_base("llama"), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), adapter_name="emb")
    with pytest.raises(LoramixError, match=r"adapter 'emb' uses LoRA on Embedding layers, which the server cannot batch; merge it"):
        Adapters(model.eval())
    model = get_peft_model(_base("llama"), LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"), adapter_name="b")
    with pytest.raises(LoramixError, match="uses bias=lora_only"):
        Adapters(model.eval())
