"""Packing: exact per-document results, no label across a boundary, a deterministic low-waste plan."""

import numpy as np
import pytest
import torch

from loramix.config import load_config
from loramix.data.packing import IGNORE, Batching, Segment, Segments, best_fit_decreasing, collate, epoch_steps, pack_eval_rows
from loramix.evaluation import evaluate
from loramix.loss import attention_mask, token_nll
from loramix.model import load_tokenizer

from conftest import REAL_DATA, tiny_lora_model


@pytest.mark.unit
def test_best_fit_decreasing_known_answer():
    lengths = np.array([5, 3, 8, 2, 6, 4])
    rows = best_fit_decreasing(lengths, np.arange(6), seq_len=10)
    assert rows == [[2, 3], [4, 5], [0, 1]]
    assert best_fit_decreasing(lengths, np.arange(6), 10) == rows


@pytest.mark.unit
@pytest.mark.parametrize("unit", ["docs", "rows"])
def test_epoch_plan_covers_every_document_once(unit):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, 500)
    b = Batching(packing=True, unit=unit, micro_batch=3, grad_accum=4, seq_len=64, window=100)
    steps = epoch_steps(lengths, b, seed=1, epoch=0)
    seen = [i for step in steps for mb in step for row in mb for i in row]
    assert sorted(seen) == list(range(500))
    for step in steps:
        assert all(len(mb) <= 3 for mb in step)
        assert all(sum(lengths[i] for i in row) <= 64 for mb in step for row in mb)
    if unit == "rows":
        assert [sum(len(mb) for mb in step) for step in steps][:-1] == [12] * (len(steps) - 1)
    else:  # exactly 12 documents per step, the shuffled order's next 12, packed among themselves
        docs = [[i for mb in step for row in mb for i in row] for step in steps]
        assert [len(d) for d in docs] == [12] * 41 + [8]
        order = np.random.default_rng([1, 0]).permutation(500)
        assert [sorted(d) for d in docs] == [sorted(order[k : k + 12].tolist()) for k in range(0, 500, 12)]
    assert list(epoch_steps(lengths, b, 1, 0)) == list(steps) != list(epoch_steps(lengths, b, 1, 1))
    rows = [row for step in steps for mb in step for row in mb]
    fill = lengths.sum() / (len(rows) * 64)
    assert fill > (0.83 if unit == "docs" else 0.9)  # uniform 1..64 in rows of 64: hard to pack, harder 12 at a time


@pytest.mark.unit
def test_unpacked_plan_is_one_document_per_row():
    lengths = np.arange(1, 30)
    steps = epoch_steps(lengths, Batching(False, "docs", 2, 2, 64, 100), seed=0, epoch=0)
    assert all(len(row) == 1 for step in steps for mb in step for row in mb)
    assert [sum(len(mb) for mb in step) for step in steps] == [4] * 7 + [1]


def _tiny():
    return tiny_lora_model(128)


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Segment(k % 3, rng.integers(0, 50000, n).astype(np.int32)) for k, n in enumerate(lengths)]


@pytest.mark.unit
def test_packed_rows_slice_as_lists_do():
    """Evaluation takes every world-th row and then batches of them: `Rows` slices as the list of its rows would."""
    rows = pack_eval_rows(Segments.of(_docs([20, 3, 57, 11, 8, 30, 2, 44, 64, 1, 9])), 64, packing=True)
    listed = [[s.tokens.tolist() for s in row] for row in rows]
    assert len(listed) == len(rows) < 11 and sum(map(len, listed)) == rows.n_segments == 11
    for part in (slice(1, None, 2), slice(0, 3), slice(None, None, 3), slice(5, 2)):
        assert [[s.tokens.tolist() for s in row] for row in rows[part]] == listed[part]


@pytest.mark.parity
def test_document_packed_second_has_the_logits_it_has_alone():
    model = _tiny()
    first, second = _docs([9, 6])
    packed = collate([[first, second]], pad_id=50256)
    alone = collate([[second]], pad_id=50256)
    with torch.no_grad():
        lp = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=attention_mask(packed.segment_ids)).logits
        la = model(input_ids=alone.input_ids, position_ids=alone.position_ids, attention_mask=attention_mask(alone.segment_ids)).logits
    torch.testing.assert_close(lp[0, 9:15], la[0], rtol=0, atol=1e-5)
    assert (lp[0, 9:15] - lp[0, :6]).abs().max() > 1e-3  # not trivially equal


@pytest.mark.parity
def test_packed_and_unpacked_per_document_losses_match():
    model = _tiny()
    docs = _docs([20, 3, 57, 11, 8, 30, 2, 44])
    rows = pack_eval_rows(Segments.of(docs), seq_len=64, packing=True)
    assert len(rows) < len(docs)
    packed = collate(rows, pad_id=50256)
    with torch.no_grad():
        nll_packed = token_nll(model, packed)
        per_doc_packed = {}
        for b, row in enumerate(rows):
            t = 0
            for seg in row:
                per_doc_packed[seg.tokens.tobytes()] = nll_packed[b, t : t + len(seg.tokens) - 1]
                assert (packed.targets[b, t + len(seg.tokens) - 1] == IGNORE)  # the boundary carries no label
                t += len(seg.tokens)
        for seg in docs:
            alone = token_nll(model, collate([[seg]], pad_id=50256))[0, : len(seg.tokens) - 1]
            torch.testing.assert_close(per_doc_packed[seg.tokens.tobytes()], alone, rtol=0, atol=1e-5)


@pytest.mark.parity
def test_packed_eval_equals_unpacked_eval():
    model = _tiny()
    docs = _docs([20, 3, 57, 11, 8, 30, 2, 44, 64, 1])
    a = evaluate(model, pack_eval_rows(Segments.of(docs), 64, True), ["a", "b", "c"], "cpu", 50256, batch_size=2)
    b = evaluate(model, pack_eval_rows(Segments.of(docs), 64, False), ["a", "b", "c"], "cpu", 50256, batch_size=3)
    assert a.rows < b.rows and a.samples == b.samples == 10
    for name in ["a", "b", "c"]:
        assert a.per_source[name].loss == pytest.approx(b.per_source[name].loss, rel=1e-5)
        assert a.per_source[name].tokens == b.per_source[name].tokens
    assert a.overall.loss == pytest.approx(b.overall.loss, rel=1e-5)


@pytest.mark.parity
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="needs ../shared/data/real")
def test_real_samples_packed_and_unpacked_validation_loss_agree(cache_dir):
    from loramix.data.prepare import prepare_data

    model = _tiny()
    results = {}
    for packing in (True, False):
        cfg = load_config(None, [f"data.local_dir={REAL_DATA}", "data.cap=80", "data.seq_len=512",
                                 f"data.packing={str(packing).lower()}", f"data.cache_dir={cache_dir}"])
        tok = load_tokenizer(cfg.model)
        data = prepare_data(cfg.data, tok, log=lambda *a: None)
        results[packing] = evaluate(model, data.val_rows, data.mixture.sources, "cpu", tok.eos_token_id, 8)
    p, u = results[True], results[False]
    assert p.rows < u.rows / 2
    assert p.overall.tokens == u.overall.tokens
    assert p.overall.loss == pytest.approx(u.overall.loss, rel=1e-4)
    assert set(p.per_source) == {"wikitext", "tinystories", "ag_news", "yelp_review_full", "cnn_dailymail", "xsum", "squad", "imdb"}
    for name in p.per_source:
        assert p.per_source[name].bpb == pytest.approx(u.per_source[name].bpb, rel=1e-4)


@pytest.mark.unit
def test_seed_recipe_plans_6375_steps_with_packing():
    """8 sources x 10,000 examples, 15% held out: 68,000 documents, 32 per step, 3 epochs."""
    lengths = np.random.default_rng(0).integers(10, 513, 68_000)
    b = Batching(packing=True, unit="docs", micro_batch=4, grad_accum=8, seq_len=512, window=2048)
    assert sum(len(epoch_steps(lengths, b, seed=0, epoch=e)) for e in range(3)) == 6375
