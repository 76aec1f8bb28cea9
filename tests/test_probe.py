"""The exactness probe: it finds a leak across packed documents and a loss that is not the model's own,
and leaves the model and the random state exactly as it found them."""

import pytest
import torch
from tiny_families import family_dir

from loramix import loss
from loramix.config import load_config
from loramix.errors import LoramixError
from loramix.model import attach_lora, load_base_model
from loramix.probe import probe, settle_packing

from conftest import tiny_lora_model


@pytest.mark.unit
def test_exact_model_passes_and_is_left_as_it_was():
    model = tiny_lora_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    verdict = probe(model)
    assert verdict.loss_exact and verdict.packing_exact and verdict.loss_diff < 1e-5 and verdict.packed_diff < 1e-5
    assert (verdict.model_type, verdict.documents, verdict.tokens, verdict.dtype) == ("gpt2", 3, 49, "float32")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # LoRA B back to zero, bit for bit
    assert [m.training for m in model.modules()] == modes and torch.equal(torch.get_rng_state(), rng)
    assert set(verdict.record()) >= {"loss_diff", "packed_diff", "loss_exact", "packing_exact", "seconds", "attention"}


@pytest.mark.unit
def test_a_leak_across_packed_documents_is_caught(monkeypatch):
    """An all-ones padding mask lets the second document see the first: the probe measures it, and
    data.packing=auto falls back to one document per row while data.packing=true stops."""
    monkeypatch.setattr(loss, "attention_mask", lambda segment_ids, config=None: (segment_ids > 0).long())
    verdict = probe(tiny_lora_model())
    assert verdict.loss_exact and not verdict.packing_exact and verdict.packed_diff > 1e-3
    lines = []
    auto = settle_packing(load_config(None, []), verdict, lines.append)
    assert auto.data.packing is False and lines[0].startswith("warning: packed rows are not exact on this gpt2 model (a document packed")
    assert settle_packing(load_config(None, ["data.packing=false"]), verdict, lines.append).data.packing is False and len(lines) == 1
    with pytest.raises(LoramixError, match="packed rows are not exact on this gpt2 model .*set data.packing=auto"):
        settle_packing(load_config(None, ["data.packing=true"]), verdict, lines.append)


@pytest.mark.unit
def test_a_loss_that_is_not_the_models_own_stops(monkeypatch, tmp_path):
    """Granite divides its logits by logits_scaling: without it loramix's loss would not be Granite's."""
    cfg = load_config(None, [f"model.name={family_dir(tmp_path, 'granite')}", "model.init=random"])
    model = attach_lora(load_base_model(cfg.model, 64), cfg.lora, 0)
    assert probe(model).loss_exact
    monkeypatch.setattr(loss, "logit_scale", lambda config: 1.0)
    verdict = probe(model)
    assert not verdict.loss_exact and verdict.loss_diff > 1e-2
    with pytest.raises(LoramixError, match="loramix's loss on this granite model differs from the model's own by up to"):
        settle_packing(cfg, verdict, print)
