"""MiniCanvas: the world, the renderer, the quick training path, and the shipped weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.minicanvas import (
    OBJECT_NAMES,
    OBJECTS,
    STYLE_NAMES,
    STYLES,
    concept_info,
    concept_table,
    prompt,
    weights_dir,
)
from erasekit.minicanvas.render import render
from erasekit.minicanvas.world import all_captions, caption_matches, sample_caption


def _shipped() -> bool:
    try:
        weights_dir()
    except ErasekitError:
        return False
    return True


needs_weights = pytest.mark.skipif(not _shipped(), reason="MiniCanvas weights not trained/shipped yet")


def test_concept_table_is_complete_and_unique():
    assert len(OBJECTS) == 12 and len(STYLES) == 12
    names = [n for c in OBJECTS + STYLES for n in (c.name, *c.synonyms)]
    assert len(names) == len(set(names)), "a name or synonym is used twice"
    assert all(2 <= len(c.synonyms) <= 3 and c.category for c in OBJECTS + STYLES)
    assert concept_info("Fish").category == "animal" and concept_info("neon").kind == "style"
    with pytest.raises(ErasekitError, match="unknown MiniCanvas concept"):
        concept_info("dragon")
    assert prompt("fish", "neon") == "A fish image in neon style."
    assert json.loads(json.dumps(concept_table()))["objects"][0]["name"] == OBJECT_NAMES[0]


def test_captions_name_what_they_say():
    rng = np.random.default_rng(0)
    for _ in range(200):
        o, s = rng.integers(12, size=2)
        caption, no, ns = sample_caption(int(o), int(s), rng)
        assert caption in set(all_captions())
        if no >= 0:
            assert any(n in caption for n in (OBJECTS[o].name, *OBJECTS[o].synonyms))
        if ns >= 0:
            assert any(n in caption for n in (STYLES[s].name, *STYLES[s].synonyms))
    match = caption_matches(np.array([[1, -1], [1, 2]]), np.array([[1, 0], [1, 2], [0, 2]]))
    assert match.tolist() == [[True, True, False], [False, True, False]]


def test_render_is_seeded_varied_and_shaped():
    a = render("fish", "neon", np.random.default_rng(3))
    b = render("fish", "neon", np.random.default_rng(3))
    c = render("fish", "neon", np.random.default_rng(4))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # every style must look different from every other on the same object pose
    means = [render("house", s, np.random.default_rng(0)).reshape(-1, 3).mean(0) for s in STYLE_NAMES]
    assert len({tuple(np.round(m, 1)) for m in means}) == len(STYLE_NAMES)
    with pytest.raises(ValueError):
        render("neon", "fish", np.random.default_rng(0))


def test_quick_training_end_to_end(tmp_path):
    from diffusers import StableDiffusionPipeline

    from erasekit.minicanvas.build import rebuild_classifier, train_minicanvas
    from erasekit.minicanvas.classifier import read_classifier
    from erasekit.minicanvas.train import TrainConfig

    torch.manual_seed(0)
    record = train_minicanvas(tmp_path, TrainConfig.quick(seed=1), eval_seeds=0)
    assert set(record["seconds"]) >= {"render", "clip", "vae", "classifier", "unet"}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.text_encoder.config.vocab_size == 49408
    from erasekit.models.tokenizer import clip_tokenizer

    text = "A goldfish image in polka dot style."
    assert pipe.tokenizer(text).input_ids == clip_tokenizer()(text).input_ids
    image = pipe("A fish image in neon style.", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    clf = read_classifier(tmp_path)
    obj, sty = clf.predict(image * 2 - 1)
    assert obj.shape == (1, 12) and sty.shape == (1, 12)
    # re-running only the classifier stage against the folder replays the full run exactly
    first = (tmp_path / "classifier.safetensors").read_bytes()
    rebuild_classifier(tmp_path, TrainConfig.quick(seed=1))
    assert (tmp_path / "classifier.safetensors").read_bytes() == first


def test_lit_tower_is_locked_while_the_text_side_trains():
    from dataclasses import replace

    from erasekit.minicanvas.data import render_set
    from erasekit.minicanvas.models import BOS_ID
    from erasekit.minicanvas.train import TrainConfig, train_clip
    from erasekit.models.tokenizer import clip_tokenizer

    data = render_set(1, np.random.default_rng(0))
    tokenizer = clip_tokenizer()

    def run(clip_steps: int) -> dict:
        torch.manual_seed(0)
        cfg = replace(TrainConfig.quick(), clip_tower_steps=4, clip_steps=clip_steps)
        return train_clip(data, cfg, tokenizer, np.random.default_rng(1), lambda _: None)

    short, long = run(1), run(4)
    for (name, a), b in zip(
        short["tower"].body.state_dict().items(), long["tower"].body.state_dict().values()
    ):
        assert torch.equal(a, b), name  # locked: same pretrained body whatever the contrastive steps
    assert not any(p.requires_grad for p in long["tower"].body.parameters())
    emb = "embeddings.token_embedding.weight"
    before, after = short["text_encoder"].get_parameter(emb), long["text_encoder"].get_parameter(emb)
    assert not torch.equal(before[BOS_ID], after[BOS_ID])  # the text side kept training


def test_cli_train_refuses_a_missing_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "erasekit.cli.main",
            "minicanvas",
            "train",
            "--quick",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "mc"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "--device 'cuda' is not available" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "mc").exists()


@pytest.mark.slow  # two more quick trainings
def test_quick_training_is_deterministic(tmp_path):
    from erasekit.minicanvas.build import train_minicanvas
    from erasekit.minicanvas.train import TrainConfig

    cfg = TrainConfig.quick(seed=5)
    train_minicanvas(tmp_path / "a", cfg, eval_seeds=0)
    train_minicanvas(tmp_path / "b", cfg, eval_seeds=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a = (tmp_path / "a" / "pipeline" / part).read_bytes()
        b = (tmp_path / "b" / "pipeline" / part).read_bytes()
        assert a == b, part


def test_cli_concepts_json():
    out = subprocess.run(
        [sys.executable, "-m", "erasekit.cli.main", "minicanvas", "concepts", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = json.loads(out)
    assert [r["name"] for r in table["styles"]] == list(STYLE_NAMES)


@needs_weights
def test_shipped_weights_load_as_sd_pipeline():
    from diffusers import StableDiffusionPipeline

    from erasekit.models.loading import load

    pipe = StableDiffusionPipeline.from_pretrained(weights_dir(), torch_dtype=torch.float32)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    model = load("minicanvas")
    # the folder's own erasekit.json names the family, whose steps and guidance are the world's protocol
    assert model.family.name == "minicanvas" and model.pipeline is not None
    assert (model.default_sampling().steps, model.default_sampling().guidance) == (25, 5.0)
    assert model.family.unet_training and model.family.cross_attention_edit  # the SD1.x code paths apply


@needs_weights
def test_shipped_classifier_api():
    from erasekit.minicanvas import load_classifier

    clf = load_classifier()
    assert clf.object_names == OBJECT_NAMES and clf.style_names == STYLE_NAMES
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    obj, sty = clf.predict(x)
    assert obj.shape == (3, 12) and sty.shape == (3, 12)
    assert clf.features(x).ndim == 2
    with pytest.raises(ErasekitError):
        clf.predict(torch.zeros(1, 3, 16, 16))


@needs_weights
def test_shipped_classifier_reads_renders():
    from erasekit.minicanvas import load_classifier
    from erasekit.minicanvas.data import render_set

    data = render_set(1, np.random.default_rng(123))
    obj, sty = load_classifier().predict(data.images)
    assert (obj.argmax(-1) == data.cells[:, 0]).float().mean() > 0.95
    assert (sty.argmax(-1) == data.cells[:, 1]).float().mean() > 0.95


@needs_weights
def test_base_generations_are_classified_correctly():
    """The quality bar on the shipped weights: the full grid, one seed per cell (docs/minicanvas.md has 2)."""
    from erasekit.minicanvas import evaluate_grid, load_classifier, load_pipeline

    result = evaluate_grid(load_pipeline(), load_classifier(), seeds=1)
    assert len(result.cells) == 144
    assert result.object_accuracy >= 90.0
    assert result.style_accuracy >= 90.0
