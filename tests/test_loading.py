"""``erasekit.load``: folders, partial folders, family detection, and clear errors for everything else."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import erasekit
from erasekit.errors import ErasekitError
from erasekit.models.tiny import build_components


def test_components_argument_loads_a_subset_without_pipeline(tiny_sd15_dir):
    model = erasekit.load(tiny_sd15_dir, components=("text_encoder", "tokenizer"))
    assert model.pipeline is None and set(model.components) == {"text_encoder", "tokenizer"}
    full = erasekit.load(tiny_sd15_dir)
    sub, ref = model.components["text_encoder"].state_dict(), full.components["text_encoder"].state_dict()
    assert all(torch.equal(sub[k], ref[k]) for k in ref)
    with pytest.raises(ErasekitError, match="lacks component"):
        model.require("unet")


def test_asking_for_an_absent_component_is_an_error(tiny_sd15_te_dir):
    with pytest.raises(ErasekitError, match="has no component.*unet"):
        erasekit.load(tiny_sd15_te_dir, components=("text_encoder", "unet"))


def test_dtype_is_applied(tiny_sd15_te_dir):
    model = erasekit.load(tiny_sd15_te_dir, dtype=torch.float16)
    assert next(model.components["text_encoder"].parameters()).dtype == torch.float16


@pytest.mark.parametrize(("family", "fixture"), [("sd15", "tiny_sd15_te_dir"), ("sd2", "tiny_sd2_te_dir")])
def test_family_is_detected_without_model_index(family, fixture, request, tmp_path):
    """SD1.x and SD2.x share a pipeline class; the encoder's activation tells them apart."""
    src = request.getfixturevalue(fixture)
    shutil.copytree(src, tmp_path / "m", ignore=shutil.ignore_patterns("model_index.json"))
    model = erasekit.load(tmp_path / "m")
    assert model.family.name == family and model.pipeline is None


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(ErasekitError, match="no model at"):
        erasekit.load(tmp_path / "nothing-here")


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ErasekitError, match="is a file"):
        erasekit.load(tmp_path / "model.safetensors")


def test_a_folder_without_components_is_an_error(tmp_path):
    with pytest.raises(ErasekitError, match="not a diffusers model folder"):
        erasekit.load(tmp_path)


def test_corrupt_model_index_is_an_error(tiny_sd15_te_dir, tmp_path):
    shutil.copytree(tiny_sd15_te_dir, tmp_path / "m")
    (tmp_path / "m" / "model_index.json").write_text("{not json")
    with pytest.raises(ErasekitError, match="not valid JSON"):
        erasekit.load(tmp_path / "m")


def test_unsupported_pipeline_class_is_an_error(tiny_sd15_te_dir, tmp_path):
    shutil.copytree(tiny_sd15_te_dir, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    (tmp_path / "m" / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "KandinskyPipeline"})
    )
    with pytest.raises(ErasekitError, match="unsupported pipeline class"):
        erasekit.load(tmp_path / "m")


def test_hub_id_offline_and_uncached_says_so(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read once at import; patch the live values too
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ErasekitError, match="offline.*cache"):
        erasekit.load("someone/some-model")


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    """transformers 5 writes only safetensors, so the pickle is written the old way, by hand."""
    parts = build_components("sd15", components="text_encoder,tokenizer", seed=4)
    encoder = parts["text_encoder"]
    encoder.config.save_pretrained(tmp_path / "text_encoder")
    torch.save(encoder.state_dict(), tmp_path / "text_encoder" / "pytorch_model.bin")
    parts["tokenizer"].save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ErasekitError, match="only pickled weights.*allow-pickle"):
        erasekit.load(tmp_path)
    model = erasekit.load(tmp_path, allow_pickle=True)
    loaded, ref = model.components["text_encoder"].state_dict(), encoder.state_dict()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)


def test_pickled_component_in_a_full_pipeline_is_refused(tiny_sd15_dir, tmp_path):
    shutil.copytree(tiny_sd15_dir, tmp_path / "m")
    vae = erasekit.load(tiny_sd15_dir, components=("vae",)).components["vae"]
    for f in (tmp_path / "m" / "vae").glob("*.safetensors"):
        f.unlink()
    torch.save(vae.state_dict(), tmp_path / "m" / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ErasekitError, match="vae holds only pickled weights"):
        erasekit.load(tmp_path / "m")
