"""RealEra and Co-Erasing: each defining property against plain code written here, on the tiny SD1.x pipeline."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import erasekit
from erasekit.errors import ErasekitError
from erasekit.methods import _image_adapter as ia
from erasekit.methods import co_erasing as co
from erasekit.methods import realera as re_
from erasekit.methods._closed_form import kv_layers, weights64
from erasekit.registry import make_config
from tests.fixtures.evaluation_tiny import one_thread  # noqa: F401

TEMPLATES = ("a photo of {}", "{} in a snapshot")


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def realera_config(**kw):
    base = {
        "templates": TEMPLATES,
        "neighbours": 3,
        "beyond": 2,
        "lamb": 1.0,
        "iterations": 0,
        "ddim_steps": 4,
    }
    return make_config("realera", "paper", "object", **{**base, **kw})


# ---- RealEra ---------------------------------------------------------------------------------------------


def test_perturbations_keep_their_bounds():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 16, generator=g)
    eta = re_.perturbations(e, 50, (0.2, 1.75), (0.5, 0.9), g)  # [50, 2, 16]
    flat, moved = e.flatten(), (e + eta).flatten(1)
    rho = eta.flatten(1).norm(dim=1) / flat.norm()
    cos = torch.nn.functional.cosine_similarity(moved, flat[None], dim=1)
    assert eta.shape == (50, 2, 16) and bool((rho >= 0.2 - 1e-6).all() and (rho <= 1.75 + 1e-6).all())
    assert bool((cos >= 0.5).all() and (cos <= 0.9).all()) and float(cos.std()) > 0.02
    with pytest.raises(ErasekitError, match="widen the bounds"):
        re_.perturbations(e, 2, (2.0, 3.0), (0.95, 1.0), g)  # ρ ≥ 2 never keeps cos ≥ 0.95


def test_mined_prompts_are_the_encoder_run_on_the_perturbed_token_embeddings(model):
    """mine() against plain code: put e + η into the token table itself, encode, put the table back."""
    pipe, config = model.pipeline, realera_config()
    mined = re_.mine(pipe, ["fish"], config)
    assert len(mined) == 2 and mined[0].neighbours.shape[0] == 3 and mined[0].beyond.shape[0] == 2
    g = torch.Generator("cpu").manual_seed(config.seed)  # the same draws, in mine()'s order
    table = pipe.text_encoder.get_input_embeddings().weight
    for template, m in zip(TEMPLATES, mined):
        prompt = template.format("fish")
        ids = pipe.tokenizer(prompt).input_ids
        (fish,) = [i for i in ids if i not in pipe.tokenizer(template.format("sky")).input_ids]
        e = table[[fish]].detach()
        etas = torch.cat([re_.perturbations(e, 3, (0.0, 1.75), (0.5, 0.9), g),
                          re_.perturbations(e, 2, (1.75, 3.0), (0.3, 0.5), g)])  # fmt: skip
        for eta, got in zip(etas, torch.cat([m.neighbours, m.beyond])):
            saved = table[fish].detach().clone()
            with torch.no_grad():
                table[fish] += eta[0]
                want = pipe.encode_prompt(prompt, "cpu", 1, False)[0][0].double()
                table[fish] = saved
            assert torch.allclose(got, want, atol=1e-5)


def test_closed_form_solves_its_normal_equations_and_keeps_beyond_concepts(model):
    """W* satisfies λ(W − W₀) + Σ (W c − W₀ m) cᵀ + s_b Σ (W − W₀) b bᵀ = 0 over the target and neighbour context
    rows and every beyond row; the beyond term holds those rows closer to their own values."""
    pipe, config = model.pipeline, realera_config()
    mined = re_.mine(pipe, ["fish"], config)
    patch = re_.closed_form(model, pipe, mined, ["fish"], config)
    without = re_.closed_form(model, pipe, mined, ["fish"], dataclasses.replace(config, beyond_scale=0.0))
    c = torch.cat([torch.cat([m.cond[None], m.neighbours])[:, m.rows].flatten(0, 1) for m in mined])
    v = torch.cat([m.mapped[m.mapped_rows].repeat(1 + m.neighbours.shape[0], 1) for m in mined])
    b = torch.cat([m.beyond.flatten(0, 1) for m in mined])
    for name, w0 in weights64(kv_layers(pipe.unet, ("to_k", "to_v"))).items():
        w = patch.tensors[f"unet/{name}.weight"].double()
        grad = config.lamb * (w - w0) + (w @ c.T - w0 @ v.T) @ c + (w - w0) @ b.T @ b
        assert float(grad.abs().max()) < 1e-6 * float((w0 @ v.T @ c).abs().max())
        free = without.tensors[f"unet/{name}.weight"].double()
        assert ((w - w0) @ b.T).norm() < ((free - w0) @ b.T).norm()


def test_the_lora_stage_is_a_merged_rank_r_update_that_aligns_the_noise(model):
    """The patch is the closed form plus a rank-1 update on every projection, and the trained model's ε for the
    target moves toward the base model's ε for the mapped prompt (on an x_t of the target's trajectory)."""
    from erasekit.denoising import encode_prompts, predict_noise, sample_until
    from erasekit.methods.common import generator

    pipe = model.pipeline
    config = realera_config(
        iterations=12, lr=1e-2, templates=TEMPLATES[:1], lamb=1e8
    )  # W* ≈ W₀: the LoRA aligns
    stage = erasekit.erase(model, ["fish"], "realera", config=dataclasses.replace(config, iterations=0))
    full = erasekit.erase(model, ["fish"], "realera", config=config)
    assert set(full.tensors) == set(stage.tensors)
    for key, w in full.tensors.items():
        delta = (w - stage.tensors[key]).double()
        assert float(delta.abs().max()) > 0 and int(torch.linalg.matrix_rank(delta, rtol=1e-3)) == 1
    c, m, null = (encode_prompts(pipe, [p]) for p in ("a photo of fish", "a photo of sky", ""))
    x_t, t = sample_until(pipe, c, null, steps=4, stop=2, guidance=3.0, generator=generator(5))

    def gap(patch):
        with patch.applied(model), torch.no_grad():
            return float((predict_noise(pipe.unet, x_t, t, c) - want).pow(2).mean())

    with torch.no_grad():
        want = predict_noise(pipe.unet, x_t, t, m)
    assert gap(full) < gap(stage)


def test_realera_bad_settings_are_one_line_errors():
    with pytest.raises(ErasekitError, match="min_cosine < max_cosine"):
        make_config("realera", min_cosine=0.9, max_cosine=0.5)
    with pytest.raises(ErasekitError, match="beyond_distance must exceed"):
        make_config("realera", beyond_distance=1.0)


# ---- Co-Erasing ------------------------------------------------------------------------------------------


def test_blur_is_torchvisions_gaussian_blur():
    """Against plain code: torchvision's kernel (σ = 0.3((k−1)/2 − 1) + 0.8) with reflect padding, by loops."""
    x = torch.randn(1, 2, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (3, 5):
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
        w = np.exp(-0.5 * (np.linspace(-(k - 1) / 2, (k - 1) / 2, k) / sigma) ** 2)
        w /= w.sum()
        padded = np.pad(x.numpy(), [(0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)], mode="reflect")
        want = np.zeros(x.shape)
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                want[:, :, i, j] = (padded[:, :, i : i + k, j : j + k] * np.outer(w, w)).sum((2, 3))
        assert np.allclose(co.gaussian_blur(x, k).numpy(), want, atol=1e-12)


def test_refinement_is_attention_over_the_text_rows():
    g = torch.Generator().manual_seed(1)
    q, text = torch.randn(1, 4, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    got = ia.refine(q, text)
    for i in range(4):
        scores = torch.tensor([float(q[0, i] @ text[0, j]) / 8**0.5 for j in range(77)])
        assert torch.allclose(got[0, i], torch.softmax(scores, 0) @ text[0], atol=1e-5)


def test_noxattn_is_every_tensor_but_attn2_and_the_time_embedding(model):
    unet = model.pipeline.unet
    names = co.parameter_names(unet, "noxattn")
    everything = [n for n, _ in unet.named_parameters()]
    left = [n for n in everything if n not in names]
    assert left and all(".attn2." in n or n.startswith("time_embedding.") for n in left)
    assert any("norm" in n for n in names) and "conv_out.weight" in names
    assert co.parameter_names(unet, "full") == everything


def test_image_loss_against_plain_code(model):
    """L₂ with a stage-1 UNet built by hand: blurred x_t, targets from it, the trained copy's prediction."""
    from erasekit.denoising import latent_shape

    pipe = model.pipeline
    config = make_config("co-erasing", blur=3, negative_guidance=1.5)
    g = torch.Generator().manual_seed(2)
    names = co.parameter_names(pipe.unet, "noxattn")
    stage1 = {n: pipe.unet.get_parameter(n).detach() + 0.01 * torch.randn(pipe.unet.get_parameter(n).shape,
                                                                            generator=g) for n in names[:6]}  # fmt: skip
    params = {n: t + 0.01 for n, t in stage1.items()}
    text = pipe.encode_prompt("fish", "cpu", 1, False)[0]
    null = pipe.encode_prompt("", "cpu", 1, False)[0]
    cond = torch.cat([text, torch.randn(1, 4, text.shape[-1], generator=g)], dim=1)  # [1, 81, D]
    x_t, t = torch.randn(latent_shape(pipe, 1), generator=g), torch.tensor(500)
    got = co.image_loss(pipe.unet, params, stage1, x_t, t, cond, null, config)

    def unet_with(values):
        net = copy.deepcopy(pipe.unet)
        with torch.no_grad():
            for n, v in values.items():
                net.get_parameter(n).copy_(v)
        return net

    z = co.gaussian_blur(x_t, 3)
    one, trained = unet_with(stage1), unet_with(params)
    with torch.no_grad():
        e_c, e_u = one(z, t, encoder_hidden_states=cond).sample, one(z, t, encoder_hidden_states=null).sample
        want = ((trained(z, t, encoder_hidden_states=cond).sample - (e_u - 1.5 * (e_c - e_u))) ** 2).mean()
    assert torch.allclose(got, want, rtol=1e-5)


def test_the_adapter_learns_to_predict_the_noise_from_the_images(model):
    """IP-Adapter's objective: training the adapter (UNet frozen) lowers the denoising loss on fixed draws."""
    from erasekit.denoising import noised, predict_noise

    pipe = model.pipeline
    g = torch.Generator().manual_seed(3)
    captions = ["A fish image in neon style.", "A cup image in pixel style."] * 2
    latents = ia.base_latents(model, captions, range(4), steps=2)
    conds = pipe.encode_prompt(captions, "cpu", 1, False)[0]  # [4, L, D]
    adapter = ia.ImageAdapter(latents.shape[1:], 4, conds.shape[-1], g)
    draws = [noised(pipe, latents, torch.Generator().manual_seed(i)) for i in range(4)]

    def loss():
        with torch.no_grad():
            return np.mean([float(((predict_noise(pipe.unet, x, t, ia.with_image(conds, adapter(latents)))
                                    - want) ** 2).mean()) for x, want, t in draws])  # fmt: skip

    before = loss()
    ia.train_adapter(pipe, latents, captions, adapter, steps=40, lr=1e-2, batch=4, generator=g)
    assert loss() < before


def test_co_erasing_patches_the_unet_alone_and_checks_its_settings(model):
    """The adapter lives only in the erase call: the patch holds UNet tensors alone."""
    patch = erasekit.erase(model, ["fish"], "co-erasing", concept_type="object", text_iterations=1, iterations=1,
                           ddim_steps=4, images=2, adapter_images=2, adapter_steps=1, adapter_batch=2,
                           image_steps=2)  # fmt: skip
    assert patch.components == ["unet"]
    with pytest.raises(ErasekitError, match="must hold stage 1's"):
        make_config("co-erasing", text_parameters="full")
    with pytest.raises(ErasekitError, match="odd kernel"):
        make_config("co-erasing", blur=4)
