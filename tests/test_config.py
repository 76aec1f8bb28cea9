import pytest

from loramix.config import describe_keys, load_config
from loramix.errors import LoramixError

from conftest import ROOT


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.name == preset.removesuffix(".yaml")


def test_seed_preset_is_the_seed_recipe():
    cfg = load_config(ROOT / "configs" / "seed.yaml")
    assert (cfg.model.name, cfg.model.init) == ("gpt2", "pretrained")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (8, 16.0, 0.1, "none")
    assert cfg.lora.targets == ["c_attn", "c_proj"]
    t = cfg.train
    assert (t.epochs, t.lr, t.weight_decay, t.warmup_steps, t.micro_batch, t.grad_accum, t.clip) == (3, 3e-4, 0.01, 100, 4, 8, 1.0)
    assert (cfg.data.cap, cfg.data.val_share, cfg.data.seq_len) == (10000, 0.15, 512)
    assert list(cfg.data.sources) == ["wikitext", "tinystories", "ag_news", "yelp_review_full", "cnn_dailymail", "xsum", "squad", "imdb"]
    wt, sq, cnn = cfg.data.sources["wikitext"], cfg.data.sources["squad"], cfg.data.sources["cnn_dailymail"]
    assert (wt.hub_id, wt.subset) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert sq.template == "{context}\n\nQuestion: {question}\nAnswer: {answers[text][0]}"
    assert (cnn.subset, cnn.template) == ("3.0.0", "{article}\n\nSummary: {highlights}")


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "seed.yaml", ["lora.r=16", "train.epochs=1", "train.lr=1e-4", "train.max_steps=7", "data.cap=null"])
    assert (cfg.lora.r, cfg.train.epochs, cfg.train.lr, cfg.train.max_steps, cfg.data.cap) == (16, 1, 1e-4, 7, None)
    assert isinstance(cfg.train.lr, float)


def test_sources_list_shorthand_and_per_source_override():
    cfg = load_config(None, ["data.sources=[squad, imdb]", "data.sources.squad.cap=5", "data.sources.squad.weight=2"])
    assert list(cfg.data.sources) == ["squad", "imdb"]
    assert cfg.data.sources["squad"].cap == 5 and cfg.data.sources["squad"].weight == 2.0
    assert cfg.data.sources["imdb"].hub_id == "imdb"


def test_custom_source_needs_hub_id_or_path():
    with pytest.raises(LoramixError, match=r"data.sources.mine: unknown source; give it a hub_id or a path"):
        load_config(None, ["data.sources=[mine]"])
    cfg = load_config(None, ["data.sources=[mine]", "data.sources.mine.path=/x.jsonl"])
    assert cfg.data.sources["mine"].path == "/x.jsonl"


@pytest.mark.parametrize("override, message", [
    ("lora.rnak=8", "unknown key 'lora.rnak' (allowed under lora.: alpha, bias, dropout, r, targets)"),
    ("trian.epochs=1", "unknown key 'trian'"),
    ("lora.r=eight", "lora.r='eight' must be an integer"),
    ("train.lr=fast", "train.lr='fast' must be a number"),
    ("data.cap=0", "data.cap=0 must be > 0"),
    ("data.cap=-5", "data.cap=-5 must be > 0"),
    ("train.micro_batch=0", "train.micro_batch=0 must be > 0"),
    ("train.grad_accum=-1", "train.grad_accum=-1 must be > 0"),
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.lr=-3e-4", "train.lr=-0.0003 must be > 0"),
    ("train.epochs=0", "train.epochs=0 must be > 0"),
    ("data.val_share=0", "data.val_share=0.0 must be in (0, 1)"),
    ("data.val_share=1.5", "data.val_share=1.5 must be in (0, 1)"),
    ("model.init=zeros", "model.init='zeros' is not allowed (choose one of: pretrained, random)"),
    ("data.sources.squad.cap=0", "data.sources.squad.cap=0 must be > 0"),
])
def test_bad_values_name_key_value_and_allowed(override, message):
    with pytest.raises(LoramixError) as e:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_all_errors_reported_at_once():
    with pytest.raises(LoramixError) as e:
        load_config(None, ["lora.r=0", "train.epochs=-1", "lora.nope=1"])
    assert "lora.r=0" in str(e.value) and "train.epochs=-1" in str(e.value) and "lora.nope" in str(e.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(LoramixError, match="is not key=value"):
        load_config(None, ["lora.r"])
    with pytest.raises(LoramixError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(LoramixError, match="not valid YAML"):
        load_config(bad)


def test_fingerprint_tracks_values():
    a, b = load_config(None), load_config(None, ["lora.r=4"])
    assert a.fingerprint() == load_config(None).fingerprint() != b.fingerprint()


def test_every_key_is_documented():
    rows = describe_keys()
    keys = {k for k, _, _ in rows}
    for k in ["model.init", "model.n_layer", "model.n_embd", "model.n_head", "data.local_dir", "data.cap", "data.val_share",
              "lora.r", "lora.alpha", "lora.dropout", "train.epochs", "train.max_steps", "train.micro_batch",
              "train.grad_accum", "train.lr", "train.eval_every", "train.seed"]:
        assert k in keys
    assert all(doc for _, _, doc in rows)
