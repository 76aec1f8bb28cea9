"""GGUF bases that cannot be used end in one line, exit code 2, and nothing written (no run dir, no cache entry)."""

import numpy as np
import pytest

from loramix.cli import main


def _gguf(path, architecture="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _truncated(path):
    _gguf(path)
    path.write_bytes(path.read_bytes()[:-1000])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "GGUF file {path} does not exist; fix model.name"),
    (_truncated, "{path} is not a whole GGUF file ("),
    (lambda p: (p.write_text("not a gguf file at all\n"), p)[1], "{path} is not a whole GGUF file ("),
    (lambda p: _gguf(p, "bert"), "GGUF file {path} holds a 'bert' model, which transformers cannot dequantize"),
])
@pytest.mark.unit
def test_unusable_gguf_fails_in_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    path = tmp_path / "base.gguf"
    make(path)
    cache = tmp_path / "cache"
    rc = main(["train", f"model.name={path}", "lora.targets=[auto]", "data.local_dir=@demo", f"data.cache_dir={cache}", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message.format(path=path) in err and "\n" not in err, err
    assert not (tmp_path / "run").exists() and not list((cache / "gguf").glob("*"))


@pytest.mark.unit
def test_a_gguf_cannot_be_random_init(tmp_path, capsys):
    rc = main(["train", f"model.name={_gguf(tmp_path / 'b.gguf')}", "model.init=random", f"data.cache_dir={tmp_path}", "--dry-run"])
    assert rc == 2 and "model.init=random needs a model dir or Hub id, not a GGUF file" in capsys.readouterr().err


@pytest.mark.unit
def test_a_hub_repo_id_with_gguf_file_resolves_through_the_hf_cache(tmp_path, monkeypatch):
    """model.name=<repo id> + model.gguf_file: the file comes from the HF cache (offline here, as in CI); a
    repo or file the cache lacks is one line naming both."""
    import huggingface_hub.constants

    from loramix.config import load_config
    from loramix.errors import LoramixError
    from loramix.gguf_bases import gguf_path

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-gguf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    _gguf(snapshot / "tiny.Q4_0.gguf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    mc = load_config(None, ["model.name=someone/tiny-gguf", "model.gguf_file=tiny.Q4_0.gguf"]).model
    assert gguf_path(mc).read_bytes() == (snapshot / "tiny.Q4_0.gguf").read_bytes()
    missing = load_config(None, ["model.name=someone/other", "model.gguf_file=tiny.Q4_0.gguf"]).model
    with pytest.raises(LoramixError, match=r"^cannot fetch tiny.Q4_0.gguf from the Hub repo someone/other or the HF cache \("):
        gguf_path(missing)
