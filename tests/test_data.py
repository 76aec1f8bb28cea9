import ast
import json
from types import SimpleNamespace

import numpy as np
import pytest

from loramix.config import load_config
from loramix.data import sources
from loramix.data.mixture import manifest_of, split_sources
from loramix.data.packing import IGNORE, Segment, collate, make_segments
from loramix.data.prepare import prepare_data
from loramix.data.sources import load_documents
from loramix.data.tokens import tokenize_documents
from loramix.errors import LoramixError
from loramix.model import load_tokenizer

from conftest import REAL_DATA, ROOT


def _mixture(data, log=print):
    """Every source split (`split_sources`), gathered: training and held-out documents, and the manifest."""
    splits = list(split_sources(data, log))
    return SimpleNamespace(train=[d for s in splits for d in s.train], val=[d for s in splits for d in s.val],
                           manifest=manifest_of(data, {s.name: s.manifest for s in splits}))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tmp_path, overrides):
    return load_config(None, [f"data.local_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_config(None).model)


@pytest.mark.unit
def test_templates_render_nested_fields_and_skip_blank_rows(tmp_path):
    _write_jsonl(tmp_path / "squad.jsonl", [
        {"context": "C1", "question": "Q1?", "answers": {"text": ["A1", "x"], "answer_start": [0, 1]}},
        {"context": "C2", "question": "Q2?", "answers": {"text": ["A2"], "answer_start": [0]}},
    ])
    _write_jsonl(tmp_path / "wikitext.jsonl", [{"text": ""}, {"text": " = T = \n"}, {"text": "   \n"}, {"text": " body \n"}])
    cfg = _cfg(tmp_path, ["data.sources=[squad, wikitext]", "data.cap=null"])
    squad = load_documents("squad", cfg.data.sources["squad"], cfg.data, None)
    assert sorted(d.text for d in squad) == ["C1\n\nQuestion: Q1?\nAnswer: A1", "C2\n\nQuestion: Q2?\nAnswer: A2"]
    wiki = load_documents("wikitext", cfg.data.sources["wikitext"], cfg.data, None)
    assert sorted((d.row, d.text) for d in wiki) == [(1, " = T = \n"), (3, " body \n")]


@pytest.mark.unit
def test_cap_is_a_seeded_sample(tmp_path):
    _write_jsonl(tmp_path / "imdb.jsonl", [{"text": f"review {i}", "label": 0} for i in range(50)])
    cfg = _cfg(tmp_path, ["data.sources=[imdb]"])
    spec = cfg.data.sources["imdb"]
    a = [d.row for d in load_documents("imdb", spec, cfg.data, 10)]
    b = [d.row for d in load_documents("imdb", spec, cfg.data, 10)]
    c = [d.row for d in load_documents("imdb", spec, load_config(None, [f"data.local_dir={tmp_path}", "data.seed=1"]).data, 10)]
    assert a == b and len(set(a)) == 10 and a != c and a != list(range(10))


@pytest.mark.unit
def test_stratified_split_and_manifest(tmp_path):
    _write_jsonl(tmp_path / "ag_news.jsonl", [{"text": f"news {i}", "label": 1} for i in range(100)])
    _write_jsonl(tmp_path / "imdb.jsonl", [{"text": f"film {i}", "label": 0} for i in range(40)])
    cfg = _cfg(tmp_path, ["data.sources=[ag_news, imdb]", "data.val_share=0.2"])
    mix = _mixture(cfg.data, log=lambda *a: None)
    m = mix.manifest.sources
    assert (m["ag_news"].train, m["ag_news"].val, m["imdb"].train, m["imdb"].val) == (80, 20, 32, 8)
    assert m["imdb"].revision is None and m["imdb"].origin == str(tmp_path / "imdb.jsonl")  # a local file has no revision
    assert sum(d.source == "imdb" for d in mix.val) == 8
    assert not {(d.source, d.row) for d in mix.train} & {(d.source, d.row) for d in mix.val}
    again = _mixture(cfg.data, log=lambda *a: None)
    assert again.manifest == mix.manifest
    other = _mixture(_cfg(tmp_path, ["data.sources=[ag_news, imdb]", "data.val_share=0.2", "data.seed=7"]).data, log=lambda *a: None)
    assert other.manifest.sources["imdb"].val_ids_sha256 != m["imdb"].val_ids_sha256


@pytest.mark.unit
def test_weights_scale_training_side_only(tmp_path):
    _write_jsonl(tmp_path / "ag_news.jsonl", [{"text": f"news {i}"} for i in range(20)])
    _write_jsonl(tmp_path / "imdb.jsonl", [{"text": f"film {i}"} for i in range(20)])
    cfg = _cfg(tmp_path, ["data.sources=[ag_news, imdb]", "data.val_share=0.25", "data.sources.imdb.weight=2.5", "data.sources.ag_news.weight=0.4"])
    mix = _mixture(cfg.data, log=lambda *a: None)
    counts = {s: sum(d.source == s for d in mix.train) for s in ("ag_news", "imdb")}
    assert counts == {"ag_news": 6, "imdb": 38}
    assert sum(d.source == "imdb" for d in mix.val) == 5


@pytest.mark.unit
def test_eos_appended_and_tokens_cached(tmp_path, tokenizer):
    from loramix.data.sources import Document, Documents

    docs = [Document("a", 0, "Hello world"), Document("a", 1, "Hi")]
    logs = []
    first = tokenize_documents(Documents.of(docs), tokenizer, str(tmp_path), logs.append)
    assert [t.ids.tolist() for t in first] == [[15496, 995, 50256], [17250, 50256]]
    assert [t.bytes.tolist() for t in first] == [[5, 6, 0], [2, 0]]  # "Hello", " world", EOS
    second = tokenize_documents(Documents.of(docs), tokenizer, str(tmp_path), logs.append)
    assert "from cache" in logs[-1] and [t.ids.tolist() for t in second] == [t.ids.tolist() for t in first]


@pytest.mark.unit
def test_a_repeated_document_is_tokenized_once(tmp_path, tokenizer):
    """A source's weight repeats documents: the store holds each once, in first-seen order, and every
    repeat reads its own tokens."""
    from loramix.data.sources import Document, Documents

    docs = Documents.of([Document("a", 0, "Hello world"), Document("a", 1, "Hi")]).take(np.array([1, 0, 1, 1, 0]))
    table = tokenize_documents(docs, tokenizer, str(tmp_path), lambda *a: None)
    assert table.offsets.tolist() == [0, 2, 5]  # "Hi" EOS, then "Hello world" EOS
    hi, hello = [17250, 50256], [15496, 995, 50256]
    assert [t.ids.tolist() for t in table] == [hi, hello, hi, hi, hello]


@pytest.mark.unit
def test_targets_keep_eos_and_skip_padding():
    eos = 50256
    rows = [[Segment(0, np.array([5, 6, 7, eos], np.int32))], [Segment(1, np.array([8, eos], np.int32))]]
    b = collate(rows, pad_id=eos)
    assert b.input_ids.tolist() == [[5, 6, 7, eos], [8, eos, eos, eos]]
    assert b.targets.tolist() == [[6, 7, eos, IGNORE], [eos, IGNORE, IGNORE, IGNORE]]
    assert b.target_source.tolist() == [[0, 0, 0, -1], [1, -1, -1, -1]]
    assert b.segment_ids.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert b.n_targets == 4


@pytest.mark.unit
def test_packed_row_targets_never_cross_documents():
    eos = 50256
    row = [Segment(0, np.array([1, 2, eos], np.int32)), Segment(2, np.array([3, eos], np.int32))]
    b = collate([row], pad_id=eos)
    assert b.targets.tolist() == [[2, eos, IGNORE, eos, IGNORE]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert b.target_source.tolist() == [[0, 0, -1, 2, -1]]


@pytest.mark.unit
def test_truncate_or_split_long_documents():
    from loramix.data.tokens import TokenTable

    ids = np.concatenate([np.arange(10), np.arange(3)]).astype(np.int32)  # two documents of 10 and 3 tokens
    toks = TokenTable(ids, np.ones(13, np.int32), np.array([0, 10, 13]), np.ones(2, np.int64), np.array([0, 1]))
    trunc = make_segments(toks, [0, 1], seq_len=4, long_docs="truncate")
    assert [s.tokens.tolist() for s in trunc] == [[0, 1, 2, 3], [0, 1, 2]]
    split = make_segments(toks, [0, 1], seq_len=4, long_docs="split")
    assert [s.tokens.tolist() for s in split] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2]]
    assert [s.source for s in split] == [0, 0, 0, 1]


# ------------------------------------------------------------------ bad input


@pytest.mark.unit
def test_template_naming_absent_field(tmp_path):
    _write_jsonl(tmp_path / "xsum.jsonl", [{"text": "x"}])
    cfg = _cfg(tmp_path, ["data.sources=[xsum]"])
    with pytest.raises(LoramixError, match=r"template names field 'document' which the data lacks \(fields: text\); fix data.sources.xsum.template"):
        load_documents("xsum", cfg.data.sources["xsum"], cfg.data, None)


@pytest.mark.unit
def test_no_usable_rows(tmp_path):
    _write_jsonl(tmp_path / "imdb.jsonl", [{"text": "  "}, {"text": ""}])
    cfg = _cfg(tmp_path, ["data.sources=[imdb]"])
    with pytest.raises(LoramixError, match="source 'imdb' has no usable rows"):
        load_documents("imdb", cfg.data.sources["imdb"], cfg.data, None)


@pytest.mark.unit
def test_too_few_rows_to_split(tmp_path):
    _write_jsonl(tmp_path / "imdb.jsonl", [{"text": "only one"}])
    cfg = _cfg(tmp_path, ["data.sources=[imdb]"])
    with pytest.raises(LoramixError, match="too few to hold out"):
        _mixture(cfg.data, log=lambda *a: None)


@pytest.mark.unit
def test_missing_local_file(tmp_path):
    cfg = _cfg(tmp_path, ["data.sources=[imdb]"])
    with pytest.raises(LoramixError, match=r"imdb.jsonl does not exist; fix data.local_dir or data.sources.imdb.path"):
        load_documents("imdb", cfg.data.sources["imdb"], cfg.data, None)


@pytest.mark.unit
@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_jsonl_is_called_empty(tmp_path, content):
    (tmp_path / "imdb.jsonl").write_text(content, encoding="utf-8")
    cfg = _cfg(tmp_path, ["data.sources=[imdb]"])
    with pytest.raises(LoramixError) as e:
        load_documents("imdb", cfg.data.sources["imdb"], cfg.data, None)
    assert str(e.value) == f"source 'imdb': {tmp_path / 'imdb.jsonl'} is empty; add rows or drop the source"


@pytest.mark.unit
def test_local_dir_that_is_a_file(tmp_path):
    _write_jsonl(tmp_path / "imdb.jsonl", [{"text": "a"}])
    cfg = load_config(None, ["data.sources=[imdb]", f"data.local_dir={tmp_path / 'imdb.jsonl'}"])
    with pytest.raises(LoramixError) as e:
        load_documents("imdb", cfg.data.sources["imdb"], cfg.data, None)
    assert str(e.value) == (f"data.local_dir={tmp_path / 'imdb.jsonl'} is a file, not a folder; "
                            "point it at a folder of <source>.jsonl files such as imdb.jsonl")


@pytest.mark.unit
def test_demo_local_dir_generates_data(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, ["data.local_dir=@demo", "data.sources=[imdb, squad]", "data.cap=20", "data.seq_len=64"])
    manifest = prepare_data(cfg.data, tokenizer, log=lambda *a: None).mixture.manifest.sources
    assert [(m.selected, m.train, m.val) for m in manifest.values()] == [(20, 17, 3), (20, 17, 3)]


@pytest.mark.unit
def test_sources_imports_only_config_and_errors():
    tree = ast.parse(open(sources.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    assert {m for m in imported if m.startswith("loramix")} == {"loramix.config", "loramix.errors"}


@pytest.mark.unit
def test_invalid_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "imdb.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    cfg = _cfg(tmp_path, ["data.sources=[imdb]"])
    with pytest.raises(LoramixError, match=r"imdb.jsonl line 2 is not valid JSON"):
        load_documents("imdb", cfg.data.sources["imdb"], cfg.data, None)


@pytest.mark.unit
def test_non_utf8_file(tmp_path):
    (tmp_path / "imdb.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    cfg = _cfg(tmp_path, ["data.sources=[imdb]"])
    with pytest.raises(LoramixError, match=r"imdb.jsonl line 1 is not UTF-8"):
        load_documents("imdb", cfg.data.sources["imdb"], cfg.data, None)


@pytest.mark.unit
def test_other_local_formats(tmp_path):
    (tmp_path / "r.csv").write_text("text,label\nfirst review,1\nsecond review,0\n", encoding="utf-8")
    cfg = load_config(None, ["data.sources=[imdb]", f"data.sources.imdb.path={tmp_path / 'r.csv'}"])
    docs = load_documents("imdb", cfg.data.sources["imdb"], cfg.data, None)
    assert sorted(d.text for d in docs) == ["first review", "second review"]


@pytest.mark.unit
def test_unreachable_hub_source_says_how_to_use_local_files():
    cfg = load_config(None, ["data.sources=[imdb]", "data.sources.imdb.hub_id=no-such-org/no-such-dataset"])
    with pytest.raises(LoramixError) as e:
        load_documents("imdb", cfg.data.sources["imdb"], cfg.data, 10)
    assert "data.local_dir=DIR with imdb.jsonl, or data.sources.imdb.path=FILE" in str(e.value)


@pytest.mark.unit
def test_hub_source_records_the_revision_it_read(tmp_path, monkeypatch):
    """A Hub dataset read offline from the datasets cache, as an online run left it (in a directory named
    by the dataset repository's commit): the manifest records that commit, and the seed's short name
    reads the canonical id."""
    import shutil

    import datasets

    sha = "3c91a4a8e0b1d7f3e5c2a9b8d7e6f5a4b3c2d1e0"
    rows = _write_jsonl(tmp_path / "rows.jsonl", [{"text": f"news {i}", "label": i % 4} for i in range(20)])
    built = datasets.load_dataset_builder("json", data_files=str(rows), cache_dir=str(tmp_path / "build"))
    built.download_and_prepare()
    cached = tmp_path / "hf" / "fancyzhx___ag_news" / "default" / "0.0.0" / sha
    shutil.copytree(built.cache_dir, cached)
    (cached / "json-train.arrow").rename(cached / "ag_news-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = load_config(None, ["data.sources=[ag_news]", "data.sources.ag_news.hub_id=ag_news", "data.cap=10", "data.val_share=0.2"])
    mix = _mixture(cfg.data, log=lambda *a: None)
    m = mix.manifest.sources["ag_news"]
    assert (m.origin, m.revision, m.train, m.val) == ("fancyzhx/ag_news::train", sha, 8, 2)
    assert {d.text for d in mix.train + mix.val} <= {f"news {i}" for i in range(20)}


@pytest.mark.unit
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="needs ../shared/data/real")
def test_real_samples_render_with_builtin_templates():
    cfg = load_config(None, [f"data.local_dir={REAL_DATA}", "data.cap=5"])
    for name, spec in cfg.data.sources.items():
        docs = load_documents(name, spec, cfg.data, 5)
        assert len(docs) == 5 and all(d.text.strip() for d in docs)
    squad = load_documents("squad", cfg.data.sources["squad"], cfg.data, 1)[0].text
    assert "\n\nQuestion: " in squad and "\nAnswer: " in squad


# ------------------------------------------------------------------ data.mix: static strategies


def _mixed(cache_dir, *extra):
    from loramix.data.prepare import prepare_data
    from loramix.model import load_tokenizer

    cfg = load_config(None, ["data.local_dir=@demo", "data.cap=60", "data.seq_len=64", f"data.cache_dir={cache_dir}", *extra])
    return cfg, prepare_data(cfg.data, load_tokenizer(cfg.model), log=lambda *a: None)


@pytest.mark.unit
@pytest.mark.parametrize("unit", ["tokens", "docs"])
def test_proportions_are_met_in_the_actual_batches(cache_dir, unit):
    """Target shares of one epoch's training units, counted in the collated batches the loop trains on."""
    from loramix.data.packing import collate, epoch_steps
    from loramix.training import batching

    shares = {"squad": 0.5, "imdb": 0.3, "ag_news": 0.2}
    cfg, data = _mixed(cache_dir, "data.sources=[squad,imdb,ag_news]", "data.mix.strategy=proportions", f"data.mix.unit={unit}",
                       "data.mix.proportions={squad: 0.5, imdb: 0.3, ag_news: 0.2}", "data.mix.budget=" + ("6000" if unit == "tokens" else "150"))
    got = np.zeros(3)
    for step in epoch_steps(data.train.length, batching(cfg), cfg.train.seed, 0):
        for mb in step:
            batch = collate([[data.train[i] for i in row] for row in mb], 0)
            for k in range(3):
                if unit == "tokens":
                    got[k] += int((batch.target_source == k).sum())
                else:
                    got[k] += sum(data.train[i].source == k for row in mb for i in row)
    assert got.sum() == pytest.approx(6000 if unit == "tokens" else 150, rel=0.01)
    for k, name in enumerate(data.mixture.sources):
        assert abs(got[k] / got.sum() - shares[name]) < 0.01
    mixed = data.mixture.manifest.mix.sources
    passes = [m.epochs for m in mixed.values()]
    assert max(passes) > 1 > min(passes)  # one source short of its share is drawn again, a larger one only in part


@pytest.mark.unit
def test_temperature_shares_follow_size_to_the_one_over_t(cache_dir):
    _, natural = _mixed(cache_dir)
    _, tempered = _mixed(cache_dir, "data.mix.strategy=temperature", "data.mix.temperature=2")
    sizes = np.array([m.tokens for m in natural.mixture.manifest.mix.sources.values()], dtype=float)
    expected = sizes ** 0.5 / (sizes ** 0.5).sum()
    got = [m.share_tokens for m in tempered.mixture.manifest.mix.sources.values()]
    assert np.abs(np.array(got) - expected).max() < 0.01
    assert abs(sum(m.tokens for m in tempered.mixture.manifest.mix.sources.values()) - sizes.sum()) < 0.01 * sizes.sum()  # same budget
    assert [len(s.tokens) for s in natural.train] == [len(s.tokens) for s in _mixed(cache_dir, "data.mix.strategy=weights")[1].train]


@pytest.mark.unit
@pytest.mark.parametrize("extra, message", [
    (["data.mix.proportions={squad: 0.5, imdb: 0.4}"], "data.mix.proportions sum to 0.9, not 1; scale them so they add up to 1"),
    (["data.mix.proportions={squad: 0.5, imbd: 0.5}"], "data.mix.proportions.imbd: not a training source (the sources are: squad, imdb)"),
    (["data.mix.strategy=temperature", "data.mix.temperature=0"], "data.mix.temperature=0.0 must be > 0"),
    (["data.mix.strategy=adaptive", "data.mix.objective=[squad, imbd]"],
     "data.mix.objective=squad,imbd: name worst, average, or training sources (the sources are: squad, imdb)"),
    (["data.mix.strategy=adaptive", "data.mix.floor=0.5"], "data.mix.floor=0.5 x 2 sources leaves no share to move; lower it below 0.5"),
    (["data.mix.strategy=adaptive", "data.mix.budget=100"], "data.mix.budget applies with proportions or temperature"),
])
def test_bad_mixtures_fail_in_one_line_and_write_nothing(cache_dir, tmp_path, capsys, extra, message):
    from loramix.cli import main

    strategy = [] if any("strategy" in e for e in extra) else ["data.mix.strategy=proportions"]
    rc = main(["train", "-c", str(ROOT / "configs" / "demo.yaml"), "data.sources=[squad,imdb]", f"data.cache_dir={cache_dir}", *strategy, *extra,
               "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ data.mix: adaptive


@pytest.mark.unit
@pytest.mark.parametrize("batch_unit", ["docs", "rows"])
def test_adaptive_steps_meet_their_weights_in_the_actual_batches(cache_dir, batch_unit):
    """Between two reweightings the drawn steps give each source its weight's share of the target tokens
    (within 1%), counted in the collated batches; the draw is a pure function of (weights, segments taken)."""
    from loramix.data.packing import collate
    from loramix.data.sampling import Steered
    from loramix.training import batching

    cfg, data = _mixed(cache_dir, "data.sources=[squad,imdb,ag_news]", "data.cap=200", f"train.batch_unit={batch_unit}")
    steered = Steered(data.train, 3, batching(cfg), "tokens", seed=0)
    weights = [0.2, 0.3, 0.5]
    steps, taken = steered.steps(weights, [0, 0, 0], 30)
    got = np.zeros(3)
    for step in steps:
        rows = [row for mb in step for row in mb]
        assert len(rows) <= cfg.train.micro_batch * cfg.train.grad_accum and all(sum(len(data.train[i].tokens) for i in r) <= 64 for r in rows)
        if batch_unit == "docs":
            assert sum(len(r) for r in rows) == cfg.train.micro_batch * cfg.train.grad_accum
        for mb in step:
            sources = collate([[data.train[i] for i in row] for row in mb], 0).target_source
            got += [int((sources == k).sum()) for k in range(3)]
    assert np.abs(got / got.sum() - weights).max() < 0.01, got / got.sum()
    assert sum(taken) == sum(len(row) for step in steps for mb in step for row in mb)
    assert taken[2] > len(steered.members[2])  # ag_news (short) gives its share in more than one pass
    again, taken_again = Steered(data.train, 3, batching(cfg), "tokens", seed=0).steps(weights, [0, 0, 0], 30)
    assert again == steps and taken_again == taken
    for k, members in enumerate(steered.members):  # each source read in whole shuffled passes: no segment twice before all once
        drawn = [i for step in steps for mb in step for row in mb for i in row if data.train[i].source == k]
        times = np.bincount(drawn, minlength=len(data.train))[members]
        assert times.max() - times.min() <= 1 and times.sum() == taken[k]


@pytest.mark.unit
def test_reweight_follows_group_dro_and_online_data_mixing():
    from loramix.config import MixConfig
    from loramix.data.sampling import reweight

    names = ["a", "b", "c"]
    start = {"weights": [1 / 3] * 3, "raw": [1 / 3] * 3, "taken": [0, 0, 0], "running": [None] * 3}
    nll, targets = np.array([300.0, 200.0, 100.0]), np.array([100.0, 100.0, 100.0])  # losses 3, 2, 1 nats
    worst = MixConfig(strategy="adaptive", objective=["worst"], step=0.5, floor=0.1, smoothing=0.5)
    one = reweight(worst, names, start, nll, targets)
    raw = np.exp(0.5 * np.array([3.0, 2.0, 1.0]))
    np.testing.assert_allclose(one["raw"], raw / raw.sum())
    np.testing.assert_allclose(one["weights"], 0.7 * raw / raw.sum() + 0.1)  # DoReMi's smoothing: every share >= the floor
    assert one["running"] == [3.0, 2.0, 1.0]
    two = reweight(worst, names, one, np.array([100.0, 200.0, 0.0]), np.array([100.0, 100.0, 0.0]))  # c unseen: keeps its estimate
    assert two["running"] == [2.0, 2.0, 1.0]  # smoothed: 0.5 x 3 + 0.5 x 1 for a
    raw2 = np.array(one["raw"]) * np.exp(0.5 * np.array([2.0, 2.0, 1.0]))
    np.testing.assert_allclose(two["raw"], raw2 / raw2.sum())  # Group DRO accumulates
    flat = reweight(worst, names, {**start, "raw": [0.5, 0.3, 0.2]}, np.array([100.0] * 3), targets)
    np.testing.assert_allclose(flat["raw"], [0.5, 0.3, 0.2])  # equal losses: no drift toward uniform
    average = MixConfig(strategy="adaptive", objective=["average"], step=0.5, floor=0.1)
    for state in (start, one):  # online data mixing: a softmax of the current estimates, whatever came before
        np.testing.assert_allclose(reweight(average, names, {**state, "running": [None] * 3}, nll, targets)["raw"], raw / raw.sum())
    listed = reweight(MixConfig(strategy="adaptive", objective=["c"], step=0.5, floor=0.1), names, start, nll, targets)
    assert listed["raw"][2] > listed["raw"][0] == pytest.approx(listed["raw"][1])  # only the listed source gains, however low its loss


@pytest.mark.e2e
def test_adaptive_dry_run_names_its_start_and_schedule(cache_dir, tmp_path, capsys):
    from loramix.cli import main

    rc = main(["train", "-c", str(ROOT / "configs" / "demo.yaml"), "model.init=random", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
               "data.sources=[squad,imdb]", f"data.cache_dir={cache_dir}", "data.mix.strategy=adaptive", "data.mix.objective=[squad]",
               "data.mix.proportions={squad: 0.2, imdb: 0.8}", "--dry-run", "--run-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "r").exists()
    assert "adaptive: from data.mix.proportions, every 10 steps toward squad (step 0.5, floor 0.25, smoothing 0.5)" in out


@pytest.mark.unit
def test_token_store_is_the_same_whatever_the_chunking(tmp_path, tokenizer, monkeypatch):
    """Bytes per token and completion starts are computed over a chunk's texts joined: chunks of 1, 2 and all
    documents, ASCII and not, give the same store (ids, bytes, completion)."""
    from loramix.data import tokens
    from loramix.data.sources import Document, Documents

    docs = [Document("a", 0, "Hello world"), Document("a", 1, "naïve café, 日本語 and 😀 emoji", 6), Document("a", 2, "x"),
            Document("a", 3, "Question: why?\nAnswer: because", 15), Document("a", 4, "  spaces\n\n\ttabs  ")]
    reference = tokenize_documents(Documents.of(docs), tokenizer, str(tmp_path / "all"), lambda *a: None)
    assert sum(int(t.bytes.sum()) for t in reference) == sum(len(d.text.encode()) for d in docs)
    for size, chars in ((1, 1 << 22), (2, 1 << 22), (4096, 8)):
        monkeypatch.setattr(tokens, "_CHUNK", size)
        monkeypatch.setattr(tokens, "_CHUNK_CHARS", chars)
        got = tokenize_documents(Documents.of(docs), tokenizer, str(tmp_path / f"{size}-{chars}"), lambda *a: None)
        assert [(t.ids.tolist(), t.bytes.tolist(), t.completion) for t in got] == [(t.ids.tolist(), t.bytes.tolist(), t.completion) for t in reference]
