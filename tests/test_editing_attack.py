"""SDEdit, the editing attack surface: the one generation path's image-to-image branch, and the attack's runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.attacks import make_budget
from erasekit.attacks.base import AttackTarget
from erasekit.attacks.concepts import prompt_set
from erasekit.attacks.editing import sdedit
from erasekit.denoising import ddim
from erasekit.errors import ErasekitError
from erasekit.evaluation.record import model_fingerprint
from erasekit.generation import Request, Sampling, render
from tests.fixtures.evaluation_tiny import fake_classifier, one_thread, tiny_model  # noqa: F401

EIGHT = Sampling(steps=8, guidance=5.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def image(model):
    return render(model.pipeline, [Request(seed=3, prompt="A circle image.")], EIGHT, desc=None)[0]


def first_unet_inputs(pipe, request: Request, sampling: Sampling) -> list[tuple[int, torch.Tensor]]:
    """``(timestep, latents [B, C, h, w])`` of every UNet call while ``request`` renders."""
    seen: list[tuple[int, torch.Tensor]] = []

    def hook(module, args, kwargs):
        seen.append((int(args[1]), args[0].detach().clone()))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        render(pipe, [request], sampling, desc=None)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_strength_sets_where_the_edit_starts_and_how_it_is_noised(model, image, strength):
    """SDEdit against plain code: int(steps·s) DDIM steps from the schedule's tail, starting from
    x_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε with z0 drawn from the VAE posterior of the image and ε from the image's seed."""
    pipe = model.pipeline
    seen = first_unet_inputs(pipe, Request(seed=5, prompt="A circle image in neon style.", init=image,
                                           strength=strength), EIGHT)  # fmt: skip
    schedule = ddim(pipe, EIGHT.steps).timesteps
    n = int(EIGHT.steps * strength)
    assert [t for t, _ in seen] == [int(t) for t in schedule[EIGHT.steps - n :]]

    g = torch.Generator("cpu").manual_seed(5)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1  # [1, 3, H, W] in [-1, 1]
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
    z0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * pipe.vae.config.scaling_factor
    eps = torch.randn(z0.shape, generator=g)
    abar = pipe.scheduler.alphas_cumprod[int(schedule[EIGHT.steps - n])]
    want = abar.sqrt() * z0 + (1 - abar).sqrt() * eps  # [1, C, h, w]
    got = seen[0][1]  # the classifier-free-guidance batch: [uncond, cond] on the same latents
    assert torch.allclose(got[0], got[1]) and torch.allclose(got[:1], want, atol=1e-5)


def test_the_sweep_changes_the_noising_and_edits_follow_the_patch(model, image):
    pipe = model.pipeline
    starts = {s: first_unet_inputs(pipe, Request(seed=1, prompt="x", init=image, strength=s), EIGHT)[0]
              for s in (0.25, 0.5, 1.0)}  # fmt: skip
    assert len({t for t, _ in starts.values()}) == 3
    assert not torch.allclose(starts[0.25][1], starts[1.0][1])
    # an edit is rendered with the model as it is: a patch in place changes it
    req = Request(seed=1, prompt="A circle image in neon style.", init=image, strength=0.5)
    before = render(pipe, [req], EIGHT, desc=None)[0]
    w = pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v").weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(3.0)
    try:
        after = render(pipe, [req], EIGHT, desc=None)[0]
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert np.abs(after - before).max() > 1e-4
    assert np.array_equal(render(pipe, [req], EIGHT, desc=None)[0], before)


def test_edit_requests_are_checked(image):
    with pytest.raises(ErasekitError, match="both an init image and a strength"):
        Request(seed=0, init=image)
    with pytest.raises(ErasekitError, match=r"strength must be in \(0, 1\]"):
        Request(seed=0, init=image, strength=1.5)
    with pytest.raises(ErasekitError, match="leaves no denoising step"):
        render(None, [Request(seed=0, init=image, strength=0.1)], EIGHT)
    with pytest.raises(ErasekitError, match="invalid sdedit budget"):
        make_budget("sdedit", overrides={"strengths": (0.0,)})
    with pytest.raises(ErasekitError, match="invalid sdedit budget"):
        make_budget("sdedit", overrides={"strengths": (), "edit_strengths": ()})


def test_candidates_edit_base_model_images_with_and_without_the_concept(model):
    ps = prompt_set("neon", "style").first(2)
    target = AttackTarget(model=model, patch=None, prompts=ps, sampling=EIGHT)
    result = sdedit(target, make_budget("sdedit", overrides={"strengths": (0.5, 0.75), "edit_strengths": (0.5,),
                                                             "seed": 7}))  # fmt: skip
    tags = [c.tag for c in result.candidates]
    assert tags == ["reedit@0.5"] * 2 + ["reedit@0.75"] * 2 + ["edit-in@0.5"] * 2
    assert all(c.prompt == ps.positives[c.group] for c in result.candidates)  # every edit prompt names it
    shown = render(model.pipeline, [Request(seed=7, prompt=p) for p in ps.positives], EIGHT, desc=None)
    plain = render(model.pipeline, [Request(seed=7, prompt=p) for p in ps.negatives], EIGHT, desc=None)
    for c in result.candidates:
        want = (shown if c.tag.startswith("reedit") else plain)[c.group]
        assert np.array_equal(c.init, want) and c.strength == float(c.tag.split("@")[1])


def test_a_run_reports_a_rate_per_mode_and_strength(model, tmp_path):
    from erasekit.attacks.run import run_attack

    before = model_fingerprint(model.components)
    budget = {"prompts": 2, "strengths": (0.5, 1.0), "edit_strengths": (0.75,)}
    metrics = run_attack(model, "neon", "sdedit", tmp_path / "run", budget=budget, sampling=EIGHT, seeds=2,
                         classifier=fake_classifier())  # fmt: skip
    assert model_fingerprint(model.components) == before
    scores = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == metrics["images"] == 2 * 3 * 2
    by_tag = {t: 100.0 * np.mean([s["success"] for s in scores if s["tag"] == t])
              for t in ("reedit@0.5", "reedit@1", "edit-in@0.75")}  # fmt: skip
    assert metrics["ASR_by_tag"] == pytest.approx(by_tag)
    assert metrics["ASR"] == pytest.approx(100.0 * np.mean([s["success"] for s in scores]))
    cands = json.loads((tmp_path / "run" / "attack.json").read_text())["candidates"]
    assert {c["init"] for c in cands} == {f"inits/i{i:04d}.png" for i in range(4)}  # 2 shown + 2 plain
    assert all((tmp_path / "run" / c["init"]).is_file() for c in cands)


def _minicanvas_shipped() -> bool:
    from erasekit.minicanvas import weights_root

    return (Path(weights_root()) / "pipeline" / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _minicanvas_shipped(), reason="MiniCanvas weights are not shipped")
def test_minicanvas_edits_bring_back_more_on_the_base_model_than_after_speed(tmp_path):
    """On MiniCanvas, editing at strength 0.9 shows the style far more often on the base model than after SPEED
    erased it (measured: 100% against 25% for vintage, 4 base prompts, both modes)."""
    import erasekit
    from erasekit.attacks.run import run_attack

    model = erasekit.load("minicanvas")
    patch = erasekit.erase(model, ["vintage"], "speed", concept_type="style")
    budget = {"prompts": 4, "strengths": (0.9,), "edit_strengths": (0.9,)}
    base = run_attack(model, "vintage", "sdedit", tmp_path / "base", budget=budget)
    erased = run_attack(model, "vintage", "sdedit", tmp_path / "speed", budget=budget, patches=[patch])
    assert base["ASR"] >= erased["ASR"] + 30.0
