"""The one generation path: generate, eval and attack make the same image; noise, safety checker, model defaults."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from erasekit.cli.main import main
from erasekit.errors import ErasekitError
from erasekit.generation import Request, Sampling, prepared, render
from erasekit.models.loading import load
from tests.fixtures.evaluation_tiny import fake_classifier, one_thread, pixels  # noqa: F401

PROMPT = "A circle image in neon style."  # the first prompt attacks on MiniCanvas's "neon" start from
SEED = 188  # UnlearnCanvas's first seed, the first seed of every protocol and attack run
TWO_STEPS = Sampling(steps=2, guidance=7.5)


def test_generate_eval_and_attack_make_the_same_image(tiny_sd15_dir, tmp_path):
    from erasekit.attacks._denoise import model_latents
    from erasekit.attacks.run import run_attack
    from erasekit.evaluation.protocols import evaluate

    argv = ["--quiet", "generate", "--model", str(tiny_sd15_dir), "--prompt", PROMPT, "--seed", str(SEED),
            "--steps", "2", "--guidance", "7.5", "--batch-size", "1", "--out", str(tmp_path / "gen")]  # fmt: skip
    assert main(argv) == 0
    model = load(tiny_sd15_dir)
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    evaluate(model, "prompts", tmp_path / "eval", prompts=str(prompts), detector="classifier", target="neon",
             seeds=1, sampling=TWO_STEPS, batch_size=1, classifier=fake_classifier())  # fmt: skip
    run_attack(model, "neon", "encoder-swap", tmp_path / "attack", budget={"prompts": 1}, seeds=1,
               sampling=TWO_STEPS, batch_size=1, classifier=fake_classifier())  # fmt: skip
    # one call path, one image per call: the same bytes by construction
    generated = (tmp_path / "gen" / f"00000_seed{SEED}.png").read_bytes()
    assert (tmp_path / "eval" / "images" / f"p00000_s{SEED}.png").read_bytes() == generated
    assert (tmp_path / "attack" / "images" / f"c0000_s{SEED}.png").read_bytes() == generated
    # the attacks' latents are that image's, before the VAE decodes them
    pipe = model.pipeline
    latents = model_latents(pipe, [PROMPT], [SEED], TWO_STEPS)  # [1, C, h, w]
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    png = pixels(tmp_path / "gen")[f"00000_seed{SEED}.png"]
    assert np.abs((image * 255).round().astype(int) - png.astype(int)).max() <= 1


def test_noise_is_drawn_on_the_cpu_one_generator_per_image(tiny_sd15_dir, monkeypatch):
    pipe = load(tiny_sd15_dir).pipeline
    seen = []
    real = type(pipe).__call__

    def spy(self, **kwargs):
        seen.append(kwargs["generator"])
        return real(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    render(pipe, [Request(seed=s, prompt="a cat") for s in (1, 2, 3)], TWO_STEPS, batch_size=2)
    assert [len(g) for g in seen] == [2, 1]
    assert all(g.device.type == "cpu" for batch in seen for g in batch)
    first = torch.Generator("cpu").manual_seed(1).initial_seed()
    assert seen[0][0].initial_seed() == first


def test_the_safety_checker_is_off_for_attacks_too(tiny_sd15_dir, tmp_path):
    from erasekit.attacks.run import run_attack

    class Checker(torch.nn.Module):  # SD's checker blacks out what it flags: it must never run
        def forward(self, *args, **kwargs):
            raise AssertionError("the safety checker ran")

    model = load(tiny_sd15_dir)
    checker = Checker()
    model.pipeline.safety_checker = checker
    metrics = run_attack(model, "neon", "encoder-swap", tmp_path / "a", budget={"prompts": 1}, seeds=1,
                         sampling=TWO_STEPS, classifier=fake_classifier())  # fmt: skip
    assert metrics["images"] == 1 and model.pipeline.safety_checker is checker


def test_prepared_puts_the_scheduler_back_even_after_an_error(tiny_sd15_dir):
    pipe = load(tiny_sd15_dir).pipeline
    before = pipe.scheduler
    with pytest.raises(RuntimeError), prepared(pipe, "EulerDiscreteScheduler"):
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        raise RuntimeError("boom")
    assert pipe.scheduler is before
    with pytest.raises(ErasekitError, match="no scheduler class"), prepared(pipe, "StableDiffusionPipeline"):
        pass


def test_sampling_defaults_belong_to_the_model_folder(tmp_path):
    """A retrained MiniCanvas folder is evaluated and attacked at the same settings: its own (25 steps, CFG 5)."""
    from erasekit.attacks.run import run_attack
    from erasekit.evaluation.protocols import evaluate
    from erasekit.minicanvas import weights_dir

    folder = tmp_path / "retrained"
    shutil.copytree(weights_dir(), folder)
    model = load(folder)
    assert model.family.name == "minicanvas" and Sampling.for_model(model) == Sampling(steps=25, guidance=5.0)
    run = evaluate(model, "minicanvas", tmp_path / "eval", objects=("circle",), styles=("neon",), seeds=1)
    attack = run_attack(model, "neon", "encoder-swap", tmp_path / "attack", budget={"prompts": 1}, seeds=1)
    record = json.loads((tmp_path / "eval" / "record.json").read_text())
    assert run["images"] == 1 and record["sampling"]["steps"] == attack["sampling"]["steps"] == 25
    assert record["sampling"]["guidance"] == attack["sampling"]["guidance"] == 5.0
    # without its folder config it is a plain SD1.x folder: the family's own defaults, the same everywhere
    (folder / "erasekit.json").unlink()
    assert load(folder).family.name == "sd15" and load(folder).default_sampling() == Sampling(
        steps=50, guidance=7.5
    )
    (folder / "erasekit.json").write_text(json.dumps({"sampling": {"steps": 7}}))
    assert load(folder).default_sampling() == Sampling(steps=7, guidance=7.5)
    (folder / "erasekit.json").write_text(json.dumps({"sampling": {"stepz": 7}}))
    with pytest.raises(ErasekitError, match="unknown sampling key"):
        load(folder).default_sampling()
    (folder / "erasekit.json").write_text(json.dumps({"family": "sdxl"}))
    with pytest.raises(ErasekitError, match="names family 'sdxl'"):
        load(folder)


def test_sampling_flags_are_generated_and_checked(tiny_sd15_dir, tmp_path, capsys):
    argv = [
        "--quiet",
        "generate",
        "--model",
        str(tiny_sd15_dir),
        "--prompt",
        "a cat",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
    assert main([*argv, "--guidance", "lots"]) == 2
    assert "bad value 'lots' for --guidance" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_run_reuses_the_same_images_of_a_finished_run_and_nothing_else(tmp_path):
    """A base run on another target links the grid images it shares with a finished run and makes only its own
    (the target's generality images); the result is the same as a fresh run's, and a run of another sampling or
    with a patch cannot be reused."""
    from erasekit.evaluation.protocols import evaluate
    from tests.fixtures.evaluation_tiny import OBJECTS, STYLES, tiny_model

    model, classifier = tiny_model(), fake_classifier()
    kw = {
        "objects": OBJECTS,
        "styles": STYLES,
        "seeds": 1,
        "sampling": TWO_STEPS,
        "classifier": classifier,
        "batch_size": 1,
    }  # one image per call: the same bytes in every run, by construction
    evaluate(model, "minicanvas", tmp_path / "neon", target="neon", **kw)
    fresh = evaluate(model, "minicanvas", tmp_path / "fresh", target="pixel", **kw)
    reused = evaluate(model, "minicanvas", tmp_path / "pixel", target="pixel", reuse=tmp_path / "neon", **kw)
    assert {k: v for k, v in reused.items() if k != "predictions"} == {
        k: v for k, v in fresh.items() if k != "predictions"
    }
    record = json.loads((tmp_path / "pixel" / "record.json").read_text())
    grid = len(OBJECTS) * len(STYLES)
    total = len(pixels(tmp_path / "fresh"))
    assert record["timings"]["images_generated"] == total - grid == 21  # the generality images only
    key = grid_key(tmp_path / "neon")
    assert os.path.samefile(
        tmp_path / "pixel" / "images" / f"{key}.png", tmp_path / "neon" / "images" / f"{key}.png"
    )
    mine, theirs = pixels(tmp_path / "pixel"), pixels(tmp_path / "fresh")
    assert sorted(mine) == sorted(theirs) and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ErasekitError, match="cannot reuse"):
        evaluate(model, "minicanvas", tmp_path / "other", target="pixel", reuse=tmp_path / "neon",
                 **{**kw, "sampling": Sampling(steps=3, guidance=7.5)})  # fmt: skip
    with pytest.raises(ErasekitError, match="not a finished erasekit run"):
        evaluate(model, "minicanvas", tmp_path / "other2", target="pixel", reuse=tmp_path / "nowhere", **kw)


def grid_key(run):
    """The key of the first grid image of a run."""
    from erasekit.evaluation.runner import read_manifest

    return next(e["key"] for e in read_manifest(run) if e["meta"]["set"] == "grid")
