"""The GPU's code paths, exercised: on a CPU wherever PyTorch can run them (fp16 autocast with the grad
scaler, bf16, torch.compile, the DataLoader worker, the eval batch-size search, device resolution),
and the rest, marked gpu, on CUDA (`python -m pytest -m gpu`; benchmarks/gpu_check.sh runs them).

The interrupted runs here stop by an exception raised at the crash point (in-process, so an overflow
can be injected into the same run); test_checkpoint.py covers the real SIGKILL."""

import json
import os
import subprocess
import types

import pytest
import torch
from crashing import kill_at
from safetensors.torch import load_file

import loramix.training as tr
from loramix import checkpoint as ckpt
from loramix.config import load_config
from loramix.data.packing import IGNORE, Segment, Segments, collate, epoch_steps, pack_eval_rows
from loramix.errors import LoramixError
from loramix.evaluation import Scorer, evaluate, first_batch_size
from loramix.loss import attention_mask, token_nll
from loramix.model import load_base_model, load_tokenizer, unwrap
from loramix.runtime import Dist, autocast_for, init_distributed, resolve_device, resolve_precision
from loramix.training import train

from conftest import ROOT, TINY, metric_rows, tiny_lora_model

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


def _cfg(cache_dir, device, *extra):
    """A tiny packed run with LoRA dropout: 6 steps of 2 x 2 rows, a checkpoint every step, eval at the end
    only; not compiled unless `extra` says so (compilation has its own test, and costs seconds per run)."""
    return load_config(ROOT / "configs" / "demo.yaml", [
        "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "data.cap=24", "data.seq_len=64", f"data.cache_dir={cache_dir}",
        "train.epochs=1", "train.micro_batch=2", "train.grad_accum=2", "train.max_steps=6", "train.log_every=1",
        "train.eval_every=null", "checkpoint.every=1", "checkpoint.keep=100", "eval.base_compare=false",
        "track.tensorboard=false", "train.compile=off", f"train.device={device}", *extra])


class _Killed(BaseException):
    """Stands for a SIGKILL at a crash point (BaseException: nothing in the loop handles it)."""


def _kill_at(monkeypatch, point: str):
    """Raise _Killed at `point`; returns the function that disarms it."""
    def crash():
        raise _Killed(point)

    return kill_at(monkeypatch, point, crash)


def _inflate_loss_at(monkeypatch, steps: set[int], factor: float, seen: list) -> None:
    """Multiply the training loss of the (1-based) optimizer steps in `steps` by `factor`; record the
    autocast state every training forward ran under."""
    real_step, real_nll = tr._train_step, tr.token_nll

    def nll(model, batch):
        seen.append(torch.get_autocast_dtype(batch.input_ids.device.type) if torch.is_autocast_enabled(batch.input_ids.device.type) else None)
        return real_nll(model, batch)

    def step(loop, *args):
        bad = loop.state.step + 1 in steps
        monkeypatch.setattr(tr, "token_nll", (lambda m, b: nll(m, b) * factor) if bad else nll)
        return real_step(loop, *args)

    monkeypatch.setattr(tr, "_train_step", step)


def _state(run_dir, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step:07d}" / "state.json").read_text())


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors")


def _assert_same_run(run, reference, exact: bool) -> None:
    """Same adapter and metric rows: bit for bit on a CPU; on CUDA to float noise (atomics may reorder sums)."""
    a, b = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0 if exact else 1e-4, atol=0 if exact else 1e-6)
    rows, ref = metric_rows(run), metric_rows(reference)
    if exact:
        assert json.dumps(rows) == json.dumps(ref)  # as text: a skipped step's NaN loss equals itself
    else:
        assert [r.keys() for r in rows] == [r.keys() for r in ref]
        for x, y in zip(rows, ref):
            assert x == pytest.approx(y, rel=1e-5, nan_ok=True), (x, y)


# ------------------------------------------------------------------- fp16 with the grad scaler, bf16


@pytest.fixture(scope="module", params=["cpu", CUDA])
def fp16_reference(request, tmp_path_factory, cache_dir):
    """An fp16 run whose step 3 overflows: its scaled gradients are infinite (the loss itself stays finite)."""
    seen, run_dir = [], tmp_path_factory.mktemp("fp16") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _inflate_loss_at(mp, {3}, 1e30, seen)
        train(_cfg(cache_dir, request.param, "train.precision=fp16"), run_dir, log=lambda *a: None)
    return request.param, run_dir, seen


@pytest.mark.parity
def test_fp16_runs_autocast_and_the_scaler_and_skips_an_overflowing_step(fp16_reference):
    _, run_dir, seen = fp16_reference
    assert set(seen) == {torch.float16} and len(seen) > 6  # every training forward (11 micro-batches), under fp16 autocast
    rows = [r for r in metric_rows(run_dir) if r["event"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["train_loss"] < 11 for k, r in enumerate(rows) if k != 2)
    scales = [_state(run_dir, s)["scaler"]["scale"] for s in range(1, 7)]
    assert scales == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]  # halved by the overflow
    before, skipped, after = _weights(run_dir, 2), _weights(run_dir, 3), _weights(run_dir, 4)
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # the overflowing step changed nothing
    assert any(not torch.equal(skipped[k], after[k]) for k in before)  # and the next one trains again
    assert all(torch.isfinite(t).all() for t in after.values())


@pytest.mark.parity
def test_fp16_run_interrupted_after_an_overflow_resumes_exactly_with_its_scale(fp16_reference, monkeypatch, tmp_path, cache_dir):
    """This run builds its batches in a DataLoader worker process (train.prefetch=on), the reference inline:
    on a CPU the weights must still be bit-identical."""
    device, reference, _ = fp16_reference
    cfg = _cfg(cache_dir, device, "train.precision=fp16", "checkpoint.every=2", "train.prefetch=on")
    _inflate_loss_at(monkeypatch, {3}, 1e30, [])
    disarm = _kill_at(monkeypatch, "step-5")  # checkpoints at steps 2 and 4; step 5 is done again
    with pytest.raises(_Killed):
        train(cfg, tmp_path / "run", log=lambda *a: None)
    assert ckpt.latest_names(tmp_path / "run") == ["step-0000002", "step-0000004"]
    assert _state(tmp_path / "run", 4)["scaler"] == _state(reference, 4)["scaler"]
    disarm()
    train(_cfg(cache_dir, device, "train.precision=fp16", "checkpoint.every=2", "train.prefetch=on", "train.resume=auto"),
          tmp_path / "run", log=lambda *a: None)
    _assert_same_run(tmp_path / "run", reference, exact=device == "cpu")
    assert _state(tmp_path / "run", 6)["scaler"] == _state(reference, 6)["scaler"]


@pytest.mark.parity
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bf16_autocasts_skips_a_nonfinite_step_and_resumes_exactly(device, monkeypatch, tmp_path, cache_dir):
    """bf16 has no scaler: a non-finite step is caught by the gradient norm. Kept to 4 steps, since bf16
    matrix products are slow on most CPUs."""
    seen = []
    _inflate_loss_at(monkeypatch, {2}, float("nan"), seen)
    cfg = _cfg(cache_dir, device, "train.precision=bf16", "train.max_steps=4")
    train(cfg, tmp_path / "ref", log=lambda *a: None)
    assert set(seen) == {torch.bfloat16}
    assert [r["skipped_steps"] for r in metric_rows(tmp_path / "ref") if r["event"] == "train"] == [0, 1, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "ref", 1).values(), _weights(tmp_path / "ref", 2).values()))
    assert _state(tmp_path / "ref", 4)["scaler"] == {}  # no scaler in bf16
    disarm = _kill_at(monkeypatch, "step-3")
    cut = _cfg(cache_dir, device, "train.precision=bf16", "train.max_steps=4", "checkpoint.every=2")
    with pytest.raises(_Killed):
        train(cut, tmp_path / "run", log=lambda *a: None)
    disarm()
    train(_cfg(cache_dir, device, "train.precision=bf16", "train.max_steps=4", "checkpoint.every=2", "train.resume=auto"),
          tmp_path / "run", log=lambda *a: None)
    _assert_same_run(tmp_path / "run", tmp_path / "ref", exact=device == "cpu")


# ------------------------------------------------------------------- torch.compile


@pytest.mark.parity
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_body_matches_eager_and_does_not_recompile_every_step(device, monkeypatch, tmp_path, cache_dir):
    """1 layer, fp32, dropout off (compiled code draws other dropout masks than eager), micro-batches of 2
    packed rows whose length varies: train losses agree to 1e-4 relative, and after the two graphs packed
    rows need (with and without a block mask) nothing compiles again. Both runs stop after step 6 of 8,
    before any evaluation, whose graphs would cost more compilation. Costs about 50 s on 2 busy CPU cores
    with a cold inductor cache, 20-25 s with a warm one (/tmp/torchinductor_$USER), nearly all of it compilation."""
    from torch._dynamo.utils import counters

    extra = ["model.n_layer=1", "model.dropout=0", "lora.dropout=0", "train.precision=fp32", "train.batch_unit=rows",
             "train.micro_batch=2", "train.grad_accum=1", "train.max_steps=8", "checkpoint.every=null"]
    _kill_at(monkeypatch, "step-6")
    with pytest.raises(_Killed):
        train(_cfg(cache_dir, device, "train.compile=off", *extra), tmp_path / "eager", log=lambda *a: None)
    torch._dynamo.reset()
    counters.clear()
    shapes, graphs = set(), []
    real_step, real_nll = tr._train_step, tr.token_nll

    def nll(model, batch):
        shapes.add((tuple(batch.input_ids.shape), int(batch.segment_ids.max()) > 1))
        return real_nll(model, batch)

    def step(loop, *args):
        stopping = real_step(loop, *args)
        graphs.append(counters["stats"]["unique_graphs"])
        return stopping

    monkeypatch.setattr(tr, "token_nll", nll)
    monkeypatch.setattr(tr, "_train_step", step)
    with pytest.raises(_Killed):
        train(_cfg(cache_dir, device, "train.compile=on", *extra), tmp_path / "compiled", log=lambda *a: None)
    eager, rows = metric_rows(tmp_path / "eager"), metric_rows(tmp_path / "compiled")
    assert [r["step"] for r in rows] == [r["step"] for r in eager] == [1, 2, 3, 4, 5, 6]
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in eager], rel=1e-4)
    assert len(shapes) >= 3 and {mask for _, mask in shapes} == {True, False}  # lengths and masks vary...
    assert graphs[2:] == [2] * 4  # ...but two graphs serve them all
    assert not counters["graph_break"], dict(counters["graph_break"])


# ------------------------------------------------------------------- batches built by a DataLoader worker


def _loop_for(cfg, data, device="cpu"):
    """What `_batches` reads of a Loop."""
    return types.SimpleNamespace(cfg=cfg, data=data, pad_id=50256, dist=Dist(), device=torch.device(device))


@pytest.mark.parity
def test_prefetch_worker_yields_the_inline_batches_in_the_same_order(cache_dir):
    from loramix.data.prepare import prepare_data

    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache_dir}"])
    data = prepare_data(cfg.data, load_tokenizer(cfg.model), log=lambda *a: None)
    steps = epoch_steps(data.train.length, tr.batching(cfg), cfg.train.seed, 0)
    loaders = {mode: tr._batches(_loop_for(load_config(ROOT / "configs" / "demo.yaml", TINY + [f"train.prefetch={mode}"]), data), steps)
               for mode in ("on", "off", "auto")}
    assert (loaders["on"].num_workers, loaders["off"].num_workers, loaders["auto"].num_workers) == (1, 0, 0)  # auto: on CUDA only
    inline, prefetched = list(loaders["off"]), list(loaders["on"])
    assert len(inline) == len(prefetched) == len(steps) > 2
    for a_step, b_step in zip(inline, prefetched):
        assert len(a_step) == len(b_step)
        for a, b in zip(a_step, b_step):
            assert (a.n_rows, a.n_docs) == (b.n_rows, b.n_docs)
            for field in ("input_ids", "position_ids", "segment_ids", "targets", "target_source"):
                assert torch.equal(getattr(a, field), getattr(b, field))


# ------------------------------------------------------------------- the eval batch-size search


def _eval_rows(n=24, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 60, n)
    docs = [Segment(k % 3, rng.integers(0, 50000, int(m)).astype(np.int32), np.full(int(m), 3, np.int32)) for k, m in enumerate(lengths)]
    return pack_eval_rows(Segments.of(docs), 64, packing=False)


@pytest.mark.parity
def test_eval_batch_search_backs_off_on_out_of_memory_and_keeps_the_metrics(monkeypatch):
    import loramix.evaluation as ev

    model, rows = tiny_lora_model(64), _eval_rows()
    tried, real_nll = [], ev.token_nll

    def nll(m, batch):
        tried.append(batch.n_rows)
        if batch.n_rows > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_nll(m, batch)

    monkeypatch.setattr(ev, "first_batch_size", lambda device: 32)  # a GPU's search, shorter
    monkeypatch.setattr(ev, "token_nll", nll)
    score = Scorer(model, torch.device("cpu"), 50256)
    found = score(rows, ["a", "b", "c"])
    assert found.batch_size == 4 and score.batch_size == 4
    assert tried == [24, 16, 8, 4, 4, 4, 4, 4, 4]  # 24 rows: each size fails at its first batch until 4 fits
    tried.clear()
    assert score(rows, ["a", "b", "c"]).overall == found.overall and tried == [4] * 6  # remembered: no search again
    explicit = evaluate(model, rows, ["a", "b", "c"], "cpu", 50256, batch_size=4)
    monkeypatch.setattr(ev, "token_nll", real_nll)
    whole = evaluate(model, rows, ["a", "b", "c"], "cpu", 50256, batch_size=24)
    assert (found.overall, found.per_source) == (explicit.overall, explicit.per_source)
    assert found.overall.loss == pytest.approx(whole.overall.loss, rel=1e-6) and found.overall.tokens == whole.overall.tokens
    monkeypatch.setattr(ev, "token_nll", nll)
    with pytest.raises(LoramixError, match=r"^evaluation ran out of GPU memory at 8 rows per batch; set a smaller eval.batch_size$"):
        evaluate(model, rows, ["a", "b", "c"], "cpu", 50256, batch_size=8)


@pytest.mark.parity
def test_eval_batch_search_starts_at_128_rows_on_any_gpu():
    assert [first_batch_size(d) for d in ("cpu", torch.device("cuda", 1), "cuda:0")] == [8, 128, 128]


# ------------------------------------------------------------------- device placement


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda reports two GPUs; set_device calls are recorded, not made."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parity
def test_each_torchrun_process_gets_its_own_gpu_never_cuda_0(two_fake_gpus, monkeypatch):
    import torch.distributed as tdist

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", backends.append)
    monkeypatch.setattr(tdist, "get_rank", lambda: 1)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    dist = init_distributed("auto")
    assert dist == Dist(rank=1, world=2, local_rank=1) and backends == ["nccl"]
    assert resolve_device("auto", dist) == torch.device("cuda", 1)
    assert resolve_device("cuda", dist) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", dist) == torch.device("cuda", 0)  # named explicitly
    assert two_fake_gpus == [torch.device("cuda", 1), torch.device("cuda", 1), torch.device("cuda", 0)]
    with pytest.raises(LoramixError, match=r"^device cuda:2 asked for, but only 2 GPU\(s\) are visible; pick one of cuda:0..cuda:1$"):
        resolve_device("cuda:2", dist)
    init_distributed("cpu")
    assert backends[-1] == "gloo"


@pytest.mark.parity
def test_device_cpu_stays_on_the_cpu_when_gpus_are_visible(two_fake_gpus, cache_dir):
    assert resolve_device("cpu", Dist(1, 2, 1)) == torch.device("cpu") and two_fake_gpus == []
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"  # CPU autocast: allowed, for the tests above
    lines = []
    train(load_config(ROOT / "configs" / "demo.yaml", TINY + [f"data.cache_dir={cache_dir}", "train.device=cpu"]),
                   None, dry_run=True, log=lines.append)
    assert "  device cpu, precision fp32" in lines and two_fake_gpus == []


# ------------------------------------------------------------------- the GPU check itself


@pytest.mark.parity
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA is told")
def test_gpu_check_stops_with_one_line_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "data"), str(tmp_path / "out")],
                          capture_output=True, text=True, check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [("gpu_check: error: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                                         "run benchmarks/gpu_check.sh on a machine with an NVIDIA GPU")]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- on a GPU only


def _docs(lengths, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Segment(k % 3, rng.integers(0, 50000, n).astype(np.int32)) for k, n in enumerate(lengths)]


def _hidden(model, batch, mask=None):
    """The body's last hidden states (B, T, C) in fp32."""
    mask = attention_mask(batch.segment_ids) if mask is None else mask
    return unwrap(model).base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask).last_hidden_state.float()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# Relative error allowed between two computations of the same hidden states, by precision.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


@pytest.mark.parity
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_packed_documents_have_the_states_and_losses_they_have_alone_on_gpu(precision):
    model, device = tiny_lora_model(128, 0, "model.n_embd=64").cuda(), torch.device("cuda")
    docs = _docs([20, 3, 57, 11, 8, 30, 2, 44])
    rows = pack_eval_rows(Segments.of(docs), 64, packing=True)
    assert len(rows) < len(docs)
    packed = collate(rows, 50256).to(device)
    with torch.no_grad(), autocast_for(device, precision)():
        hidden, nll = _hidden(model, packed), token_nll(model, packed)
        leaky = _hidden(model, packed, (packed.segment_ids > 0).long())  # causal over the whole row: documents see each other
        errors, leaks = [], []
        for b, row in enumerate(rows):
            t = 0
            for seg in row:
                alone = collate([[seg]], 50256).to(device)
                n = len(seg.tokens)
                errors.append(_rel(hidden[b, t : t + n], _hidden(model, alone)[0]))
                torch.testing.assert_close(nll[b, t : t + n - 1], token_nll(model, alone)[0, : n - 1], rtol=TOLERANCE[precision], atol=1e-4)
                assert packed.targets[b, t + n - 1] == IGNORE
                if t:
                    leaks.append(_rel(leaky[b, t : t + n], _hidden(model, alone)[0]))
                t += n
    assert max(errors) < TOLERANCE[precision]
    assert min(leaks) > 3 * TOLERANCE[precision]  # the check can fail: without the mask the states differ (by 0.18 on CPU)


@pytest.mark.parity
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_merged_model_matches_the_adapter_on_gpu(precision):
    import copy

    model, device = tiny_lora_model(128, 0, "model.n_embd=64"), torch.device("cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter: B is zero at init
    merged = copy.deepcopy(model).merge_and_unload().to(device).eval()
    model = model.to(device)
    batch = collate(pack_eval_rows(Segments.of(_docs([20, 3, 57, 11, 8, 30])), 64, packing=True), 50256).to(device)
    with torch.no_grad(), autocast_for(device, precision)():
        adapter, nll = _hidden(model, batch), token_nll(model, batch)
        with model.disable_adapter():
            base = _hidden(model, batch)
        assert _rel(_hidden(merged, batch), adapter) < TOLERANCE[precision]
        torch.testing.assert_close(token_nll(merged, batch), nll, rtol=TOLERANCE[precision], atol=1e-4)
    assert _rel(base, adapter) > 10 * TOLERANCE[precision]


@pytest.mark.parity
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_flash_attention_varlen_matches_sdpa_on_gpu(precision):
    pytest.importorskip("flash_attn")
    device, losses = torch.device("cuda"), {}
    for attention in ("sdpa", "flash_attention_2"):
        cfg = load_config(None, ["model.init=random", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", f"model.attention={attention}"])
        model = load_base_model(cfg.model, 128).to(device).eval()
        batch = collate(pack_eval_rows(Segments.of(_docs([20, 3, 57, 11, 8, 30])), 64, True), 50256).to(device)
        with torch.no_grad(), autocast_for(device, precision)():
            losses[attention] = token_nll(model, batch).float().cpu()
    torch.testing.assert_close(losses["flash_attention_2"], losses["sdpa"], rtol=2e-2, atol=2e-2)
