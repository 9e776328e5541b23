"""M-ErasureBench's scenarios: learned embeddings (white- and black-box) and inverted latents (DDIM inversion
through the erased or the base model, regenerated with the empty and a neutral prompt), and the generation
path's initial latents they need."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from erasekit.attacks import make_budget
from erasekit.attacks.base import AttackTarget
from erasekit.attacks.concepts import prompt_set
from erasekit.errors import ErasekitError
from erasekit.evaluation.record import model_fingerprint
from erasekit.generation import Request, Sampling, render
from tests.fixtures.evaluation_tiny import fake_classifier, one_thread, tiny_model  # noqa: F401
from tests.test_attacks import te_patch, unet_patch

TWO_STEPS = Sampling(steps=2, guidance=7.5)
PROMPT = "A circle image in neon style."


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def target_for(model, patch=None, n=2, sampling=TWO_STEPS) -> AttackTarget:
    return AttackTarget(
        model=model, patch=patch, prompts=prompt_set("neon", "style").first(n), sampling=sampling
    )


# ---- initial latents on the one generation path ----------------------------------------------------------


def seed_noise(pipe, seed: int) -> torch.Tensor:
    """The start latents ``[C, h, w]`` the pipeline itself draws for ``seed`` (one CPU generator per image)."""
    cfg = pipe.unet.config
    return torch.randn((1, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                       generator=torch.Generator("cpu").manual_seed(seed))[0]  # fmt: skip


def test_request_latents_replace_the_seeds_noise(model):
    pipe, s = model.pipeline, Sampling(steps=3, guidance=3.0)
    own = render(pipe, [Request(seed=5, prompt=PROMPT)], s, desc=None)[0]
    given = render(pipe, [Request(seed=99, prompt=PROMPT, latents=seed_noise(pipe, 5))], s, desc=None)[0]
    assert np.abs(own - given).max() <= 1 / 255  # seed 5's noise handed over = seed 5's image
    other = render(pipe, [Request(seed=5, prompt=PROMPT, latents=seed_noise(pipe, 6))], s, desc=None)[0]
    assert np.abs(own - other).max() > 0.05  # the latents, not the seed, decide the image


def test_requests_with_and_without_latents_batch_apart(model):
    pipe, s = model.pipeline, Sampling(steps=2, guidance=3.0)
    reqs = [Request(seed=1, prompt=PROMPT), Request(seed=2, prompt=PROMPT, latents=seed_noise(pipe, 7)),
            Request(seed=3, prompt="A star image.")]  # fmt: skip
    together = render(pipe, reqs, s, batch_size=3, desc=None)
    alone = [render(pipe, [r], s, desc=None)[0] for r in reqs]
    assert all(np.abs(a - b).max() <= 1 / 255 for a, b in zip(together, alone))


def test_latents_of_the_wrong_shape_and_mixed_shapes_are_handled(model):
    pipe, s = model.pipeline, Sampling(steps=2, guidance=3.0)
    with pytest.raises(ErasekitError, match=r"latents are \[C, h, w\]"):
        Request(seed=1, prompt=PROMPT, latents=seed_noise(pipe, 1)[None])
    with pytest.raises(ErasekitError, match="not both"):
        Request(seed=1, prompt=PROMPT, latents=seed_noise(pipe, 1), init=np.zeros((32, 32, 3)), strength=0.5)
    # a repeated prompt (shared across the batch) with its own latents, batched, equals each image alone
    reqs = [Request(seed=i, prompt=PROMPT, latents=seed_noise(pipe, 10 + i)) for i in range(3)]
    together = render(pipe, reqs, s, batch_size=3, desc=None)
    alone = [render(pipe, [r], s, desc=None)[0] for r in reqs]
    assert all(np.abs(a - b).max() <= 1 / 255 for a, b in zip(together, alone))


def test_latent_inversion_refuses_a_sampler_its_inversion_does_not_mirror(model):
    from erasekit.attacks.latent_inversion import latent_inversion

    euler = Sampling(steps=2, guidance=7.5, scheduler="EulerDiscreteScheduler")
    with pytest.raises(ErasekitError, match="pass --scheduler DDIMScheduler"):
        latent_inversion(target_for(model, sampling=euler), make_budget("latent-inversion"))


# ---- DDIM inversion ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_inversion_reconstructs_the_image(model, steps):
    """Inverting an image and regenerating with the same model, prompt and steps (guidance 1) gives it back."""
    from erasekit.attacks._denoise import ddim_invert, model_latents
    from erasekit.denoising import encode_prompts

    pipe, s = model.pipeline, Sampling(steps=steps, guidance=1.0)
    x0 = model_latents(pipe, [PROMPT], [3], s)  # [1, C, h, w]
    start = ddim_invert(pipe, x0, encode_prompts(pipe, [PROMPT]), steps)
    back = render(pipe, [Request(seed=0, prompt=PROMPT, latents=start[0])], s, output="latent", desc=None)[0]
    fresh = render(pipe, [Request(seed=0, prompt=PROMPT)], s, output="latent", desc=None)[0]
    error, chance = (back - x0[0]).norm() / x0.norm(), (fresh - x0[0]).norm() / x0.norm()
    assert error < 0.1 and error < chance / 10
    assert abs(float(start.std()) - 1.0) < 0.2  # a noise-like start, not the image
    images = [pipe.vae.decode(z[None] / pipe.vae.config.scaling_factor).sample for z in (x0[0], back, fresh)]
    assert (images[1] - images[0]).abs().mean() < (images[2] - images[0]).abs().mean() / 5


# ---- learned embeddings: white-box and black-box -------------------------------------------------------


TI = {"prompts": 2, "images": 2, "train_steps": 4, "batch": 2, "accumulation": 1}


def test_black_box_embedding_is_learned_on_the_base_model(model):
    from erasekit.attacks.textual_inversion import textual_inversion, textual_inversion_transfer

    config = make_budget("textual-inversion-transfer", overrides=TI)
    transfer = textual_inversion_transfer(target_for(model, te_patch(model)), config)
    on_base = textual_inversion(target_for(model, None), config)
    white = textual_inversion(target_for(model, te_patch(model)), config)
    learned = {
        k: r.embeddings["learned_embedding"] for k, r in (("bb", transfer), ("base", on_base), ("wb", white))
    }
    assert torch.allclose(learned["bb"], learned["base"], atol=1e-6)  # never saw the erased weights
    assert not torch.allclose(learned["bb"], learned["wb"], atol=1e-4)
    assert transfer.stats["learned_on"] == "base" and white.stats["learned_on"] == "erased"
    assert transfer.patch is not None  # but generates with the erased model


def test_embedding_scenarios_share_the_cce_budgets():
    for kind in ("style", "object", "nsfw"):
        assert make_budget("textual-inversion-transfer", "paper", kind) == make_budget(
            "textual-inversion", "paper", kind
        )
    quick = make_budget("textual-inversion-transfer", "quick", "object")
    assert (quick.images, quick.train_steps, quick.init_word) == (8, 200, "object")


def counting(monkeypatch, module, name: str, calls: dict[str, int]) -> None:
    """Count the calls of ``module.name`` in ``calls[name]``, calling through."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_what_depends_on_the_base_model_alone_is_made_once_per_process(model, monkeypatch):
    from erasekit.attacks import _memo
    from erasekit.attacks import latent_inversion as li
    from erasekit.attacks import textual_inversion as ti

    _memo.clear()
    calls: dict[str, int] = {}
    for module, name in ((ti, "train"), (ti, "training_posterior"), (li, "invert"), (li, "concept_latents")):
        counting(monkeypatch, module, name, calls)
    ti_config = make_budget("textual-inversion-transfer", overrides=TI)
    un, te = unet_patch(model), te_patch(model)
    first = ti.textual_inversion_transfer(target_for(model, un), ti_config)
    again = ti.textual_inversion_transfer(target_for(model, te), ti_config)
    assert (calls["train"], calls["training_posterior"]) == (1, 1)  # learned once for both erasures
    assert torch.equal(first.embeddings["learned_embedding"], again.embeddings["learned_embedding"])
    assert first.stats == again.stats and first.history == again.history and again.patch is te
    white = [ti.textual_inversion(target_for(model, p), ti_config) for p in (un, te)]
    assert (calls["train"], calls["training_posterior"]) == (3, 1)  # white-box learns on each erasure
    assert not torch.allclose(
        white[0].embeddings["learned_embedding"], white[1].embeddings["learned_embedding"]
    )
    # a value handed out is a clone: changing it changes nothing the memo hands out next
    first.embeddings["learned_embedding"].add_(1.0)
    third = ti.textual_inversion_transfer(target_for(model, un), ti_config)
    assert torch.equal(third.embeddings["learned_embedding"], again.embeddings["learned_embedding"])

    li_config = make_budget("latent-inversion", overrides={"prompts": 2})
    black = [li.latent_inversion_transfer(target_for(model, p), li_config) for p in (un, te)]
    assert (calls["invert"], calls["concept_latents"]) == (2, 1)  # one inversion per prompt tag, once
    li.latent_inversion(target_for(model, un), li_config)
    li.latent_inversion(target_for(model, te), li_config)
    assert (calls["invert"], calls["concept_latents"]) == (6, 1)  # white-box inverts through each erasure
    assert all(torch.equal(black[0].embeddings[k], black[1].embeddings[k]) for k in black[0].embeddings)

    # what the memo hands out is what a fresh computation gives
    _memo.clear()
    fresh = ti.textual_inversion_transfer(target_for(model, te), ti_config)
    assert torch.allclose(
        fresh.embeddings["learned_embedding"], again.embeddings["learned_embedding"], atol=1e-6
    )
    # another budget, prompt set or base model makes it again
    ti.textual_inversion_transfer(target_for(model, te), make_budget(
        "textual-inversion-transfer", overrides={**TI, "train_steps": 3}))  # fmt: skip
    ti.textual_inversion_transfer(target_for(model, te, n=1), ti_config)
    assert calls["train"] == 6
    with _memo.disabled():  # the benchmark's plain variant: made afresh every time
        ti.textual_inversion_transfer(target_for(model, te), ti_config)
    assert calls["train"] == 7
    other = tiny_model()
    with torch.no_grad():
        next(other.pipeline.unet.parameters()).add_(1e-3)
    li.latent_inversion_transfer(target_for(other), li_config)
    assert calls["concept_latents"] == 2  # a changed base model makes its concept images again


# ---- inverted latents: white-box and black-box ---------------------------------------------------------


def test_latent_inversion_goes_through_the_erased_or_the_base_model(model):
    from erasekit.attacks.latent_inversion import latent_inversion, latent_inversion_transfer

    config = make_budget("latent-inversion", overrides={"prompts": 2})
    un, te = unet_patch(model), te_patch(model)
    white = latent_inversion(target_for(model, un), config)
    black = latent_inversion_transfer(target_for(model, un), config)
    black_other = latent_inversion_transfer(target_for(model, te), config)
    on_base = latent_inversion(target_for(model, None), config)
    for v in ("empty", "neutral"):
        key = f"inverted_{v}"
        assert torch.allclose(black.embeddings[key], on_base.embeddings[key], atol=1e-6)
        assert torch.allclose(black.embeddings[key], black_other.embeddings[key], atol=1e-6)
        assert not torch.allclose(white.embeddings[key], black.embeddings[key], atol=1e-4)
    assert (white.stats["inverted_through"], black.stats["inverted_through"]) == ("erased", "base")
    prompts = {(c.tag, c.prompt) for c in white.candidates}
    assert prompts == {("empty", ""), ("neutral", "A circle image."), ("neutral", "A square image.")}
    assert all(c.latents is not None and c.latents.shape == (4, 8, 8) for c in white.candidates)
    assert len(white.candidates) == 4 and all(c.seeds == (0,) for c in white.candidates)


def test_regenerate_picks_the_prompts(model):
    from erasekit.attacks.latent_inversion import latent_inversion

    only = latent_inversion(
        target_for(model), make_budget("latent-inversion", overrides={"regenerate": "empty"})
    )
    assert {c.tag for c in only.candidates} == {"empty"} and set(only.embeddings) == {"inverted_empty"}
    with pytest.raises(ErasekitError, match="invalid latent-inversion budget"):
        make_budget("latent-inversion", overrides={"regenerate": "sideways"})


@pytest.mark.parametrize("attack", ["latent-inversion", "latent-inversion-transfer"])
def test_latent_scenarios_report_crr_per_prompt(model, tmp_path, attack, monkeypatch):
    from erasekit.attacks import _memo
    from erasekit.attacks.run import run_attack
    from erasekit.evaluation import record

    before = model_fingerprint(model.components)
    _memo.clear()
    calls: dict[str, int] = {}
    counting(monkeypatch, record, "model_fingerprint", calls)
    metrics = run_attack(model, "neon", attack, tmp_path / "run", patches=[te_patch(model), unet_patch(model)],
                         budget={"prompts": 3}, seeds=2, sampling=TWO_STEPS, classifier=fake_classifier())  # fmt: skip
    assert calls["model_fingerprint"] == 1  # the memo's key and the record share one hash of the base model
    saved_record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert saved_record["model"]["sha256"] == before
    assert model_fingerprint(model.components) == before
    scores = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == metrics["images"] == 6  # 3 images x 2 prompts, once each (DDIM adds no noise)
    for v in ("empty", "neutral"):
        mine = [s["success"] for s in scores if s["tag"] == v]
        assert metrics["ASR_by_tag"][v] == pytest.approx(100.0 * sum(mine) / len(mine))
    assert metrics["ASR"] == pytest.approx(100.0 * sum(s["success"] for s in scores) / 6)  # CRR
    assert metrics["sampling"]["candidate_seeds"] == [188]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "embeddings.safetensors"))
    assert saved["inverted_empty"].shape == (3, 4, 8, 8)
    lines = (tmp_path / "run" / "prompts.txt").read_text().splitlines()
    assert lines[0] == "<inverted image 0>" and lines[3] == "<inverted image 0> A circle image."


def test_asr_by_tag_counts_attack_rows_only():
    from erasekit.attacks.run import _summary

    rows = [{"group": 0, "seed": 1, "phase": "attack", "success": s, "tag": v}
            for v, s in (("a", True), ("a", False), ("b", False), ("b", False))]  # fmt: skip
    rows.append({"group": 0, "seed": 1, "phase": "pre", "success": True})
    out = _summary("images", {"rows": rows})
    assert out["ASR_by_tag"] == {"a": 50.0, "b": 0.0} and out["ASR"] == 25.0
    assert "ASR_by_tag" not in _summary("images", {"rows": [{**r, "tag": None} for r in rows[:4]]})


# ---- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--attack", "latent-inversion", "--budget", "regenerate=sideways"],
            "invalid latent-inversion budget",
        ),
        (["--attack", "latent-inversion-transfer", "--budget", "steps=3"], "unknown budget key 'steps'"),
        (["--attack", "textual-inversion-transfer", "--preset", "fast"], "no preset"),
    ],
)
def test_cli_errors_are_one_line(tiny_sd15_dir, tmp_path, capsys, args, message):
    from erasekit.cli.main import main

    code = main(
        ["attack", "--model", str(tiny_sd15_dir), "--concept", "neon", "--out", str(tmp_path / "o"), *args]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_cli_latent_inversion_needs_a_unet_pipeline(tiny_sd15_te_dir, tmp_path, capsys):
    from erasekit.cli.main import main

    code = main(["--quiet", "attack", "--model", str(tiny_sd15_te_dir), "--attack", "latent-inversion", "--concept", "neon",
                 "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a full pipeline" in err and len(err.splitlines()) == 1
