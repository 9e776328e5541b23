"""All but One and CRCE: their losses against plain code, their MiniCanvas substitutes and what training does.

The plain references call the tiny UNet directly (``unet(x, t, encoder_hidden_states=c).sample``), never the
helpers in ``erasekit.methods`` or ``erasekit.denoising``.
"""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit import progress
from erasekit.errors import ErasekitError
from erasekit.methods.all_but_one import AllButOneConfig, all_but_one_loss, alternatives
from erasekit.methods.common import trainable_copies
from erasekit.methods.crce import CRCEConfig, erase_and_retain, retain_loss
from erasekit.methods.esd import parameter_names
from tests.fixtures.evaluation_tiny import encode, one_thread  # noqa: F401

progress.set_enabled(False)
TRAIN = {"iterations": 12, "ddim_steps": 3, "lr": 2e-3}


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def fixed_sample(model, n: int = 1) -> tuple[torch.Tensor, int]:
    unet = model.components["unet"]
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(3)), 400


def eps(unet, x, t, cond) -> torch.Tensor:
    with torch.no_grad():
        return unet(x.expand(cond.shape[0], -1, -1, -1), t, encoder_hidden_states=cond).sample


def perturbed_copies(unet) -> dict[str, torch.Tensor]:
    params = trainable_copies(unet, parameter_names(unet, "attn2"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return params


def test_all_but_one_loss_matches_plain_code(model):
    pipe, unet = model.pipeline, model.components["unet"]
    params = perturbed_copies(unet)
    c, alt, null = encode(pipe, ["fish"]), encode(pipe, ["animal"]), encode(pipe, [""])
    x, t = fixed_sample(model)
    got = all_but_one_loss(unet, params, x, t, {"c": c, "alt": alt, "null": null}, preserve_weight=0.7)
    # plain: the trained model is the UNet with the perturbed tensors loaded
    base = eps(unet, x, t, torch.cat([alt, null]))
    saved = {n: unet.get_parameter(n).detach().clone() for n in params}
    with torch.no_grad():
        for n, p in params.items():
            unet.get_parameter(n).copy_(p)
    try:
        trained = eps(unet, x, t, torch.cat([c, null]))
    finally:
        with torch.no_grad():
            for n, p in saved.items():
                unet.get_parameter(n).copy_(p)
    guide = ((trained[0] - trained[1]) - (base[0] - base[1])).square().mean()
    keep = (trained[1] - base[1]).square().mean()
    assert torch.allclose(got, guide + 0.7 * keep, rtol=1e-5)


def guidance_gap(model, patch) -> tuple[float, float]:
    """``(‖Δ_θ(fish) − Δ*(animal)‖, ‖ε_θ(∅) − ε*(∅)‖)`` on a fixed x_t, Δ(c) = ε(c) − ε(∅)."""
    pipe, unet = model.pipeline, model.components["unet"]
    x, t = fixed_sample(model)
    conds = torch.cat([encode(pipe, ["fish"]), encode(pipe, ["animal"]), encode(pipe, [""])])
    base = eps(unet, x, t, conds)
    with patch.applied(model):
        trained = eps(unet, x, t, conds)
    gap = ((trained[0] - trained[2]) - (base[1] - base[2])).norm().item()
    return gap, (trained[2] - base[2]).norm().item()


def test_all_but_one_moves_the_guidance_term_onto_the_alternative_and_holds_uncond(model):
    pipe, unet = model.pipeline, model.components["unet"]
    x, t = fixed_sample(model)
    conds = torch.cat([encode(pipe, ["fish"]), encode(pipe, ["animal"]), encode(pipe, [""])])
    base = eps(unet, x, t, conds)
    before = ((base[0] - base[2]) - (base[1] - base[2])).norm().item()
    free = erasekit.erase(model, ["fish"], "all-but-one", concept_type="object", preserve_weight=0.0, **TRAIN)
    held = erasekit.erase(model, ["fish"], "all-but-one", concept_type="object", **TRAIN)  # λ = 1
    (gap_free, drift_free), (gap_held, drift_held) = guidance_gap(model, free), guidance_gap(model, held)
    assert gap_free < 0.7 * before and gap_held < 0.8 * before
    assert drift_held < 0.7 * drift_free


def test_all_but_one_alternative_is_the_world_category_or_the_users():
    assert alternatives(["fish", "watercolor"], None) == ["animal", "painting"]
    assert alternatives(["Van Gogh"], "dry brushing") == ["dry brushing"]
    with pytest.raises(ErasekitError, match="alternative"):
        alternatives(["Van Gogh"], None)


def test_crce_world_coreferents_and_retained():
    erase, retained = erase_and_retain(["fish"], CRCEConfig())
    assert erase == ["fish", "goldfish", "trout", "A fish image.", "a picture of a fish", "A goldfish image."]
    assert retained == ["circle", "square", "triangle"]
    erase, retained = erase_and_retain(["neon"], CRCEConfig(n_coref=2, n_retain=3))
    assert erase == ["neon", "glowing", "fluorescent"]
    assert retained == ["pixel", "sketch", "blueprint"]  # the same super-category (digital art) first
    erase, retained = erase_and_retain(["cat"], CRCEConfig(coreferents=("kitten",), retained=("dog", "cat")))
    assert (erase, retained) == (["cat", "kitten"], ["dog"])
    with pytest.raises(ErasekitError, match="coreferents"):
        erase_and_retain(["cat"], CRCEConfig())


def test_crce_retain_term_matches_plain_code(model):
    pipe, unet = model.pipeline, model.components["unet"]
    params = perturbed_copies(unet)
    kept = encode(pipe, ["circle", "square", "triangle"])
    x, t = fixed_sample(model)
    got = retain_loss(unet, params, x, t, kept)
    base = eps(unet, x, t, kept)
    trained = torch.func.functional_call(
        unet, params, (x.expand(3, -1, -1, -1), t), {"encoder_hidden_states": kept}
    )
    assert torch.allclose(got, (trained.sample.detach() - base).square().mean(), rtol=1e-5)


def drift(model, patch, prompt: str) -> float:
    pipe, unet = model.pipeline, model.components["unet"]
    x, t = fixed_sample(model)
    cond = encode(pipe, [prompt])
    base = eps(unet, x, t, cond)
    with patch.applied(model):
        return (eps(unet, x, t, cond) - base).norm().item()


def test_crce_retain_term_keeps_the_retained_concepts(model):
    plain = erasekit.erase(model, ["fish"], "crce", concept_type="object", retain_weight=0.0, **TRAIN)
    kept = erasekit.erase(model, ["fish"], "crce", concept_type="object", retain_weight=20.0, **TRAIN)
    assert drift(model, kept, "circle") < 0.6 * drift(model, plain, "circle")


def test_crce_erases_the_target_and_each_coreferent_in_turn(model, monkeypatch):
    import erasekit.methods.crce as crce

    seen = []
    real = crce.esd_loss

    def recording(unet, params, x_t, t, emb, eta):
        seen.append(emb["c"].detach().clone())
        assert torch.equal(emb["from"], emb["c"])
        return real(unet, params, x_t, t, emb, eta)

    monkeypatch.setattr(crce, "esd_loss", recording)
    erase, _ = erase_and_retain(["fish"], CRCEConfig())
    erasekit.erase(model, ["fish"], "crce", concept_type="object", iterations=len(erase), ddim_steps=2)
    assert torch.allclose(torch.cat(seen), encode(model.pipeline, erase), atol=1e-6)


def test_paper_level_configs_refuse_bad_values():
    with pytest.raises(ValueError):
        AllButOneConfig(preserve_weight=-1)
    with pytest.raises(ValueError):
        CRCEConfig(n_coref=-1)


@pytest.mark.parametrize("method", ["all-but-one", "crce"])
def test_an_iterations_grid_in_one_run_is_each_count_trained_alone(model, method):
    from erasekit.registry import erase_jointly, make_config

    configs = [make_config(method, "paper", "object", **{**TRAIN, "iterations": n}) for n in (2, 5, 3)]
    joint = erase_jointly(model, ["circle"], method, configs)
    alone = [erasekit.erase(model, ["circle"], method, config=c) for c in configs]
    for j, a in zip(joint, alone, strict=True):
        assert j.config == a.config and set(j.tensors) == set(a.tensors)
        for name, tensor in a.tensors.items():
            assert torch.allclose(j.tensors[name], tensor, rtol=0, atol=1e-6), name
    moved = max((joint[0].tensors[n] - joint[1].tensors[n]).abs().max().item() for n in joint[0].tensors)
    assert moved > 1e-4  # two more iterations moved the weights: each count is its own snapshot
