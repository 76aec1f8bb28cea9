import dataclasses
import subprocess
import sys

import pytest
import yaml

from loramix.config import BUILTIN_SOURCES, Config, config_from_dict, describe_keys, load_config
from loramix.errors import LoramixError

from conftest import ROOT


@pytest.mark.unit
@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.name == preset.removesuffix(".yaml")


@pytest.mark.unit
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


@pytest.mark.unit
def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "seed.yaml", ["lora.r=16", "train.epochs=1", "train.lr=1e-4", "train.max_steps=7", "data.cap=null"])
    assert (cfg.lora.r, cfg.train.epochs, cfg.train.lr, cfg.train.max_steps, cfg.data.cap) == (16, 1, 1e-4, 7, None)
    assert isinstance(cfg.train.lr, float)


@pytest.mark.unit
def test_sources_list_shorthand_and_per_source_override():
    cfg = load_config(None, ["data.sources=[squad, imdb]", "data.sources.squad.cap=5", "data.sources.squad.weight=2"])
    assert list(cfg.data.sources) == ["squad", "imdb"]
    assert cfg.data.sources["squad"].cap == 5 and cfg.data.sources["squad"].weight == 2.0
    assert cfg.data.sources["imdb"].hub_id == "stanfordnlp/imdb"


@pytest.mark.unit
def test_legacy_hub_names_are_aliases_of_the_canonical_ids():
    cfg = load_config(None, ["data.sources=[ag_news, mine]", "data.sources.ag_news.hub_id=ag_news", "data.sources.mine.hub_id=xsum",
                             "data.sources.mine.template={document}"])
    assert (cfg.data.sources["ag_news"].hub_id, cfg.data.sources["mine"].hub_id) == ("fancyzhx/ag_news", "EdinburghNLP/xsum")
    assert load_config(None, ["data.sources.x.hub_id=someone/ag_news"]).data.sources["x"].hub_id == "someone/ag_news"


@pytest.mark.unit
def test_custom_source_needs_hub_id_or_path():
    with pytest.raises(LoramixError, match=r"data.sources.mine: unknown source; give it a hub_id or a path"):
        load_config(None, ["data.sources=[mine]"])
    cfg = load_config(None, ["data.sources=[mine]", "data.sources.mine.path=/x.jsonl"])
    assert cfg.data.sources["mine"].path == "/x.jsonl"


@pytest.mark.parametrize("override, message", [
    ("lora.rnak=8", "unknown key 'lora.rnak' (allowed under lora.: alpha, bias, dropout, init, r, targets, use_dora, use_rslora)"),
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
    ("lora.dropout=1", "lora.dropout=1.0 must be in [0, 1)"),
    ("train.weight_decay=-1", "train.weight_decay=-1.0 must be >= 0"),
    ("train.compile=maybe", "train.compile='maybe' is not allowed (choose one of: auto, on, off)"),
    ("data.packing=maybe", "data.packing='maybe' must be true, false or auto"),
    ("lora=5", "lora=5 must be a mapping of keys"),
])
@pytest.mark.unit
def test_bad_values_name_key_value_and_allowed(override, message):
    with pytest.raises(LoramixError) as e:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.unit
def test_all_errors_reported_at_once():
    with pytest.raises(LoramixError) as e:
        load_config(None, ["lora.r=0", "train.epochs=-1", "lora.nope=1"])
    assert "lora.r=0" in str(e.value) and "train.epochs=-1" in str(e.value) and "lora.nope" in str(e.value)


@pytest.mark.unit
def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(LoramixError, match="is not key=value"):
        load_config(None, ["lora.r"])
    with pytest.raises(LoramixError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(LoramixError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.unit
def test_fingerprint_tracks_values():
    a, b = load_config(None), load_config(None, ["lora.r=4"])
    assert a.fingerprint() == load_config(None).fingerprint() != b.fingerprint()


@pytest.mark.unit
def test_key_roles_decide_the_fingerprint_and_the_eval_overrides():
    """Roles are metadata on the fields: what a resume compares, and what `eval` may change."""
    from loramix.commands import EVAL_OVERRIDES
    from loramix.config import scoring_keys

    base = load_config(None).fingerprint()
    operational = ["checkpoint.every=7", "checkpoint.keep=9", "track.wandb=true", "train.resume=auto", "train.prefetch=on", "data.cache_dir=/elsewhere"]
    assert all(load_config(None, [o]).fingerprint() == base for o in operational)
    assert all(load_config(None, [o]).fingerprint() != base for o in ["lora.r=4", "data.packing=false", "train.seed=1", "eval.batch_size=2"])
    assert EVAL_OVERRIDES == scoring_keys() == ("data.packing", "data.cache_dir", "train.precision", "train.compile", "train.device", "eval.")


@pytest.mark.unit
def test_a_config_built_in_code_fails_as_a_preset_does():
    """`loramix.Config(...)` and its sections raise LoramixError with the CLI's line, never pydantic's error."""
    import loramix
    from loramix.config import LoraConfig

    with pytest.raises(LoramixError, match=r"^bad Config\(\.\.\.\): lora.r='abc' must be an integer$"):
        loramix.Config(lora={"r": "abc"})
    with pytest.raises(LoramixError, match=r"unknown key 'bogus' \(allowed under top level: checkpoint, data, eval, lora, model, name, track, train\)"):
        loramix.Config(bogus=1)
    with pytest.raises(LoramixError, match=r"^bad LoraConfig\(\.\.\.\): lora.r=0 must be > 0$"):
        LoraConfig(r=0)
    assert loramix.Config(lora={"r": 4}).lora.r == 4


@pytest.mark.unit
def test_every_key_is_documented():
    rows = describe_keys()
    keys = {k for k, _, _ in rows}
    for k in ["model.init", "model.n_layer", "model.n_embd", "model.n_head", "data.local_dir", "data.cap", "data.val_share",
              "lora.r", "lora.alpha", "lora.dropout", "train.epochs", "train.max_steps", "train.micro_batch",
              "train.grad_accum", "train.lr", "train.eval_every", "train.seed"]:
        assert k in keys
    assert all(doc for _, _, doc in rows)


@pytest.mark.unit
def test_a_bad_integer_is_one_error_not_two():
    with pytest.raises(LoramixError) as e:
        load_config(None, ["lora.r=abc"])
    assert str(e.value) == "bad config: lora.r='abc' must be an integer"


@pytest.mark.unit
def test_unknown_source_is_reported_with_the_other_errors():
    with pytest.raises(LoramixError) as e:
        load_config(None, ["data.sources=[mine]", "lora.r=0"])
    assert str(e.value).startswith("bad config: lora.r=0 must be > 0; data.sources.mine: unknown source; give it a hub_id or a path")


@pytest.mark.unit
@pytest.mark.parametrize("text, value", [("on", "on"), ("off", "off"), ("On", "on"), ('"on"', "on"), ("auto", "auto")])
def test_compile_takes_on_and_off_as_words(text, value):
    assert load_config(None, [f"train.compile={text}"]).train.compile == value


@pytest.mark.unit
def test_yaml_booleans_map_back_to_word_choices(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  compile: on\ndata:\n  packing: off\n", encoding="utf-8")
    cfg = load_config(preset)
    assert (cfg.train.compile, cfg.data.packing) == ("on", False)
    assert config_from_dict({"train": {"compile": False}}).train.compile == "off"


@pytest.mark.unit
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_forms_load(device):
    assert load_config(None, [f"train.device={device}"]).train.device == device


@pytest.mark.unit
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_unknown_device_fails_at_load(device):
    with pytest.raises(LoramixError) as e:
        load_config(None, [f"train.device={device}"])
    assert str(e.value) == f"bad config: train.device='{device}' is not a device (choose one of: auto, cpu, cuda, cuda:N, mps)"


@pytest.mark.unit
def test_string_fields_take_the_override_text():
    cfg = load_config(None, ["data.sources.squad.template={body}", "data.sources.squad.subset=3.0", "lora.targets=c_attn"])
    assert (cfg.data.sources["squad"].template, cfg.data.sources["squad"].subset, cfg.lora.targets) == ("{body}", "3.0", ["c_attn"])


@pytest.mark.unit
def test_saved_config_round_trips():
    cfg = load_config(ROOT / "configs" / "seed.yaml", ["train.compile=off", "data.sources.squad.cap=5"])
    saved = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert config_from_dict(saved) == cfg
    assert dataclasses.replace(cfg.data, local_dir="/d").sources == cfg.data.sources


@pytest.mark.unit
def test_builtin_sources_fill_the_defaults():
    assert list(Config().data.sources) == list(BUILTIN_SOURCES)
    assert Config().data.sources["cnn_dailymail"].subset == "3.0.0"


@pytest.mark.unit
def test_cap_for_prefers_the_source_cap():
    data = load_config(None, ["data.sources=[squad, imdb]", "data.sources.squad.cap=5", "data.cap=7"]).data
    assert (data.cap_for(data.sources["squad"]), data.cap_for(data.sources["imdb"])) == (5, 7)
    assert load_config(None, ["data.cap=null"]).data.cap_for(data.sources["imdb"]) is None


@pytest.mark.unit
def test_config_imports_no_later_stage():
    code = "import sys, loramix.config; print(sorted(m for m in sys.modules if m.startswith('loramix')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['loramix', 'loramix.config', 'loramix.errors']"
