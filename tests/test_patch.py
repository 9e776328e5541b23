"""The Patch contract: round-trip, fingerprint refusal, exact removal, composition, strict loading, no clobber."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from erasekit.errors import ErasekitError
from erasekit.export import export_component, import_component, save_patched_model
from erasekit.fingerprint import fingerprints
from erasekit.models.families import FAMILIES
from erasekit.models.loading import LoadedModel
from erasekit.models.tokenizer import clip_tokenizer
from erasekit.patch import CONFIG_FILE, TENSOR_FILE, Patch

W0 = "encoder.layers.0.self_attn.q_proj.weight"
B0 = "encoder.layers.0.mlp.fc1.bias"


def tiny_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4
    )
    return CLIPTextModel(cfg).eval()


def tiny_model(seed: int = 0, tmp: Path | None = None) -> LoadedModel:
    comps = {"text_encoder": tiny_encoder(seed), "tokenizer": clip_tokenizer()}
    return LoadedModel(f"tiny-{seed}", tmp or Path("."), FAMILIES["sd15"], comps)


def make_patch(model: LoadedModel, names=(W0,), delta: float = 0.5, seed: int = 1) -> Patch:
    enc = model.components["text_encoder"]
    g = torch.Generator().manual_seed(seed)
    state = enc.state_dict()
    tensors = {
        f"text_encoder/{n}": state[n] + delta * torch.randn(state[n].shape, generator=g) for n in names
    }
    prints = {f"text_encoder/{n}": fingerprints(state[n]) for n in names}
    return Patch(
        tensors=tensors, fingerprints=prints, method="test", concepts=("cat",), base_model=model.source
    )


def encode(model: LoadedModel, text: str = "a photo of a cat") -> torch.Tensor:
    tok = model.components["tokenizer"]
    ids = tok(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.components["text_encoder"](ids).last_hidden_state


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    patch = make_patch(model, names=(W0, B0))
    patch.save(tmp_path / "p")
    loaded = Patch.load(tmp_path / "p")
    assert set(loaded.tensors) == set(patch.tensors)
    assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)
    assert loaded.fingerprints == patch.fingerprints and loaded.concepts == ("cat",)
    text = (tmp_path / "p" / CONFIG_FILE).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [CONFIG_FILE, TENSOR_FILE]


def test_apply_remove_restores_exactly():
    model = tiny_model()
    before = encode(model)
    handle = make_patch(model).apply_(model)
    during = encode(model)
    handle.remove()
    assert not torch.allclose(before, during)
    assert torch.equal(before, encode(model))


def test_wrong_base_is_refused():
    patch = make_patch(tiny_model(seed=0))
    other = tiny_model(seed=1)
    before = encode(other)
    with pytest.raises(ErasekitError, match="wrong base model"):
        patch.apply_(other)
    assert torch.equal(before, encode(other))


def test_missing_component_is_refused():
    patch = make_patch(tiny_model())
    empty = LoadedModel("x", Path("."), FAMILIES["sd15"], {"tokenizer": clip_tokenizer()})
    with pytest.raises(ErasekitError, match="component 'text_encoder'"):
        patch.apply_(empty)


def test_applies_to_half_precision_copy():
    model = tiny_model()
    patch = make_patch(model)
    model.components["text_encoder"].half()
    patch.apply_(model)
    got = model.components["text_encoder"].get_parameter(W0)
    assert torch.equal(got, patch.tensors[f"text_encoder/{W0}"].half())


def test_compose_disjoint_and_conflicts():
    model = tiny_model()
    a, b = make_patch(model, (W0,), seed=1), make_patch(model, (B0,), seed=2)
    both = Patch.compose([a, b])
    assert set(both.tensors) == set(a.tensors) | set(b.tensors)
    c = make_patch(model, (W0,), seed=3)
    with pytest.raises(ErasekitError, match="merge rule"):
        Patch.compose([a, c])
    mean = Patch.compose([a, c], merge="mean")
    key = f"text_encoder/{W0}"
    assert torch.allclose(mean.tensors[key], (a.tensors[key] + c.tensors[key]) / 2)
    with pytest.raises(ErasekitError, match="unknown merge rule"):
        Patch.compose([a, c], merge="max")


def test_compose_refuses_different_bases():
    a = make_patch(tiny_model(seed=0))
    b = make_patch(tiny_model(seed=1))
    with pytest.raises(ErasekitError, match="different models"):
        Patch.compose([a, b], merge="mean")


def test_strict_loading(tmp_path):
    model = tiny_model()
    path = make_patch(model).save(tmp_path / "p")
    blob = (path / TENSOR_FILE).read_bytes()
    (path / TENSOR_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ErasekitError, match="cannot be read"):
        Patch.load(path)
    (path / TENSOR_FILE).write_bytes(blob)
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["fingerprints"]["text_encoder/extra.weight"] = {"float32": "0"}
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ErasekitError, match="missing tensors"):
        Patch.load(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ErasekitError, match="not valid JSON"):
        Patch.load(path)


def test_unknown_keys_warn(tmp_path):
    path = make_patch(tiny_model()).save(tmp_path / "p")
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["future_field"] = 1
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="future_field"):
        Patch.load(path)


def test_pickle_is_refused(tmp_path):
    path = make_patch(tiny_model()).save(tmp_path / "p")
    (path / TENSOR_FILE).unlink()
    torch.save({"x": torch.zeros(1)}, path / "patch.bin")
    with pytest.raises(ErasekitError, match="pickled"):
        Patch.load(path)


def test_save_never_clobbers(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    patch = make_patch(tiny_model())
    with pytest.raises(ErasekitError, match="already exists"):
        patch.save(out)
    assert (out / "mine.txt").read_text() == "keep me"
    patch.save(out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / TENSOR_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no staging directories left behind


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = make_patch(tiny_model()).save(tmp_path / "p")
    finally:
        os.umask(old)
    # staged in mkdtemp / mkstemp (0700 / 0600), the results still read like any file the user makes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}


def test_export_import_round_trip(tmp_path):
    model = tiny_model()
    patch = make_patch(model, names=(W0, B0))
    export_component(model, patch, "text_encoder", tmp_path / "te")
    assert torch.equal(model.components["text_encoder"].get_parameter(W0), tiny_encoder(0).get_parameter(W0))
    back = import_component(model, "text_encoder", tmp_path / "te")
    assert set(back.tensors) == set(patch.tensors)
    assert all(torch.equal(back.tensors[k], patch.tensors[k]) for k in patch.tensors)
    assert back.fingerprints == patch.fingerprints
    with pytest.raises(ErasekitError, match="identical"):
        import_component(model, "text_encoder", _save_plain(model, tmp_path / "plain"))


def _save_plain(model: LoadedModel, out: Path) -> Path:
    model.components["text_encoder"].save_pretrained(out)
    return out


def test_save_patched_text_encoder_only_model(tmp_path):
    model = tiny_model(tmp=tmp_path)
    patch = make_patch(model)
    save_patched_model(model, [patch], tmp_path / "out")
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder")
    assert torch.equal(reloaded.get_parameter(W0), patch.tensors[f"text_encoder/{W0}"])
    assert torch.equal(model.components["text_encoder"].get_parameter(W0), tiny_encoder(0).get_parameter(W0))
