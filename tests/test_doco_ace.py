"""DoCo and ACE on the tiny SD1.x pipeline: each method's defining property against plain code.

The plain code reads the releases (yongliang-wu/DoCo ``train.py`` and ``DoCo/gradient_clip.py``, 120L020904/ACE
``src/train_ace.py``) with torch, diffusers' schedulers and the MiniCanvas world as data; it calls nothing in
``erasekit.methods`` except the function under test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

import erasekit
from erasekit import progress
from erasekit.errors import ErasekitError
from erasekit.methods import ace, doco
from erasekit.patch import Patch
from erasekit.registry import make_config
from tests.fixtures.evaluation_tiny import encode, one_thread  # noqa: F401

progress.set_enabled(False)


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def kv_names(unet) -> list[str]:
    return [n for n, _ in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]


# ---- DoCo ----------------------------------------------------------------------------------------------


def test_doco_surgery_is_the_released_rule_and_the_projection():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 5, generator=g)
    a = -0.5 * b + 0.1 * torch.randn(6, 5, generator=g)  # conflicting: cos < 0
    a_hat, b_hat = a / a.norm(), b / b.norm()
    cos = (a_hat * b_hat).sum()
    assert cos < 0
    # gradient_clip.py: p.grad -= lambda_ * dot(a/|a|, b/|b|) * b/|b|
    assert torch.allclose(doco.surgery(a, b, "release", 0.7), a - 0.7 * cos * b_hat, atol=1e-6)
    projected = doco.surgery(a, b, "projection", 1.0)
    assert abs(float((projected * b).sum())) < 1e-4  # on the normal plane of g_prior
    assert torch.equal(doco.surgery(a, b, "none", 1.0), a)
    assert torch.equal(doco.surgery(-a, b, "release", 1.0), -a)  # agreeing gradients pass unchanged


def test_doco_clipping_follows_clip_grad_norm():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(4, 3, generator=g) * 5, torch.randn(7, generator=g) * 5]
    params = [torch.zeros_like(x, requires_grad=True) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for mine, p in zip(doco.clipped(grads, 1.0), params):
        assert torch.allclose(mine, p.grad, atol=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(doco.clipped(grads, 0.0), grads))


def test_doco_x0_prediction_inverts_the_forward_process(model):
    pipe = model.pipeline
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    for clip in (False, True):  # step_batch clamps x0 when the scheduler config says clip_sample
        sched = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=clip)
        x_t = sched.add_noise(x0, noise, t)
        expected = x0.clamp(-1, 1) if clip else x0
        assert torch.allclose(doco.predicted_x0(sched, noise, x_t, t), expected, atol=1e-3)


def test_doco_discriminator_fits_the_latent_side():
    g = torch.Generator().manual_seed(0)
    small = doco.discriminator(4, 8, g, torch.device("cpu"))
    again = doco.discriminator(4, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(small.state_dict().values(), again.state_dict().values()))
    sd = doco.discriminator(4, 64, g, torch.device("cpu"))
    # the release's PatchGAN on SD's 64x64 latents: four stride-2 blocks to 4x4, then 3x3 patch logits
    assert [m.stride for m in sd.modules() if isinstance(m, torch.nn.Conv2d)][:4] == [(2, 2)] * 4
    assert sd(torch.randn(2, 4, 64, 64)).shape == (2, 1, 3, 3)
    assert small(torch.randn(2, 4, 8, 8)).shape == (2, 1, 3, 3)
    assert (
        sum(p.numel() for p in sd.parameters())
        > 2_700_000
        > 100_000
        > sum(p.numel() for p in small.parameters())
    )


def test_doco_discriminator_step_separates_real_from_fake():
    g = torch.Generator().manual_seed(3)
    d = doco.discriminator(4, 8, g, torch.device("cpu"))
    opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.999))
    real, fake = torch.randn(8, 4, 8, 8, generator=g) + 1.0, torch.randn(8, 4, 8, 8, generator=g) - 1.0
    losses = [doco.discriminator_step(d, opt, real, fake) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():  # label 0 is the anchor (real), 1 the target (fake), as released
        assert d(real).mean() < d(fake).mean()


def test_doco_captions_swap_the_anchor_for_the_concept():
    pairs = doco.caption_pairs("fish", "animal", "object")
    assert ("A animal image in neon style.", "A fish image in neon style.") in pairs
    assert all(a.replace("animal", "fish") == c for a, c in pairs)
    styles = doco.caption_pairs("neon", "digital art", "style")
    assert ("A fish image in digital art style.", "A fish image in neon style.") in styles
    assert doco.anchor_of("fish", make_config("doco", concept_type="object")) == "animal"
    with pytest.raises(ErasekitError, match="anchor="):
        doco.anchor_of("zebra", make_config("doco", concept_type="object"))


def test_doco_generator_step_is_the_surgery_of_the_clipped_gradients(model):
    """One UNet update against plain autograd: clip each gradient, remove the conflict per tensor, step."""
    pipe = model.pipeline
    unet = pipe.unet
    config = make_config("doco", concept_type="object", batch_size=2, max_grad_norm=0.05, surgery_lambda=1.0)
    g = torch.Generator().manual_seed(4)
    names = kv_names(unet)
    params = {n: unet.get_parameter(n).detach().clone().requires_grad_(True) for n in names}
    d = doco.discriminator(4, 8, g, torch.device("cpu"))
    x_t, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100, 400, 700, 900])
    noise, cond = torch.randn(4, 4, 8, 8, generator=g), encode(pipe, ["a fish", "a cup", "a tree", "a key"])
    sched = DDPMScheduler.from_config(pipe.scheduler.config)

    def forward(p):
        pred = torch.func.functional_call(unet, p, (x_t, t), {"encoder_hidden_states": cond}).sample
        return doco.predicted_x0(sched, pred[:2], x_t[:2], t[:2]), pred[2:]

    # plain code, from a copy of D (the step also moves D's gradients)
    d_plain = doco.discriminator(4, 8, torch.Generator().manual_seed(9), torch.device("cpu"))
    d_plain.load_state_dict(d.state_dict())
    fake, prior_pred = forward(params)
    logits = d_plain(fake)
    adv = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
    prior = F.mse_loss(prior_pred, noise[2:])
    g_a = torch.autograd.grad(adv, list(params.values()), retain_graph=True)
    g_p = torch.autograd.grad(prior, list(params.values()))

    def clip(gs):
        total = torch.sqrt(sum((x**2).sum() for x in gs))
        return [x * min(1.0, 0.05 / (float(total) + 1e-6)) for x in gs]

    expected = {}
    for n, a, b in zip(params, clip(g_a), clip(g_p)):
        cos = torch.dot(a.flatten() / a.norm(), b.flatten() / b.norm())
        step = a - cos * b / b.norm() if cos < 0 else a
        expected[n] = params[n].detach() - step  # SGD, lr 1
    assert any(torch.dot(a.flatten(), b.flatten()) < 0 for a, b in zip(g_a, g_p)), "no conflict to remove"

    fake, prior_pred = forward(params)
    opt = torch.optim.SGD(params.values(), lr=1.0)
    doco.generator_step(d, opt, params, fake, prior_pred, noise[2:], config)
    for n in names:
        assert torch.allclose(params[n].detach(), expected[n], atol=1e-6), n
    assert all(p.grad is not None for p in d.parameters())  # as released: D keeps L_adv's gradient


def test_doco_trains_the_unet_only_after_the_warmup(model, monkeypatch):
    calls = []
    real_step = doco.generator_step
    monkeypatch.setattr(doco, "generator_step", lambda *a: calls.append(1) or real_step(*a))
    config = dict(iterations=5, warmup=2, batch_size=1, anchor_images=2, anchor_steps=2)
    erasekit.erase(model, ["fish"], method="doco", concept_type="object", **config)
    assert len(calls) == 2  # steps 3 and 4: the release's global_step > warm_up


# ---- ACE -----------------------------------------------------------------------------------------------


def adapted_with_random_b(model, config, g):
    from erasekit.methods.spm import lora_copy, transformer_layers

    unet = model.pipeline.unet
    names = transformer_layers(unet)
    adapted, layers = lora_copy(unet, names, config.rank, config.alpha, g)
    with torch.no_grad():
        for layer in layers.values():  # a trained-looking B, so the adapted model differs from the base
            b = layer.lora_B["default"].weight
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return adapted, layers


def test_ace_loss_is_the_released_objective(model):
    pipe = model.pipeline
    unet = pipe.unet
    config = ace.ACEConfig(negative_guidance=2.0, surrogate_guidance=1.5, prior_weight=0.3, null_weight=0.7)
    g = torch.Generator().manual_seed(0)
    adapted, layers = adapted_with_random_b(model, config, g)
    c, null, anchors = encode(pipe, ["fish"]), encode(pipe, [""]), encode(pipe, ["cup", "tree"])
    x, t, w = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(700), torch.tensor([0.2, 0.9])
    emb = {"c": c, "null": null, "anchors": anchors}
    loss = ace.ace_loss(unet, adapted, x, t, emb, w, config)
    # plain code: the adapted model is the base with W + (alpha / rank) B A merged in
    merged = {
        f"{n}.weight": unet.get_submodule(n).weight
        + config.alpha
        / config.rank
        * torch.einsum(
            "or,r...->o...", layer.lora_B["default"].weight.flatten(1), layer.lora_A["default"].weight
        )
        for n, layer in layers.items()
    }
    rows = {"0": null, "p": c, "a0": anchors[:1], "a1": anchors[1:]}
    with torch.no_grad():
        e = {k: unet(x, t, encoder_hidden_states=v).sample for k, v in rows.items()}
        with Patch.from_tensors(model, "unet", merged).applied(model):
            th = {k: unet(x, t, encoder_hidden_states=v).sample for k, v in rows.items()}
    sur = 0.2 * (e["a0"] - e["0"]) + 0.9 * (e["a1"] - e["0"])
    null_loss = F.mse_loss(th["0"], e["0"] + 2.0 * (e["p"] - e["0"]) - 1.5 * sur)
    cond_loss = F.mse_loss(th["p"], e["0"] - 2.0 * (e["p"] - e["0"]))
    prior = (F.mse_loss(th["a0"], e["a0"]) + F.mse_loss(th["a1"], e["a1"])) / 2
    expected = 0.7 * (0.7 * null_loss + 0.3 * cond_loss) + 0.3 * prior
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)


def test_ace_timesteps_are_the_released_index_into_the_full_schedule(model):
    short = DDIMScheduler.from_config(model.pipeline.scheduler.config)
    short.set_timesteps(30)
    full = DDIMScheduler.from_config(model.pipeline.scheduler.config)
    full.set_timesteps(1000)
    mapping = ace.release_timesteps(model.pipeline, 30)
    for s in (0, 7, 29):  # train_ace.py: scheduler.timesteps(1000)[int(t_end * 1000 / ddim_steps)]
        assert int(mapping[int(short.timesteps[s])]) == int(full.timesteps[int(s * 1000 / 30)])


def test_ace_anchor_batches_cover_the_list_each_pass():
    batches = ace.AnchorBatches(5, 2, torch.Generator().manual_seed(0))
    drawn = [i for _ in range(5) for i in batches.next()]  # two full passes
    assert sorted(drawn[:5]) == list(range(5)) and sorted(drawn[5:]) == list(range(5))
    config = ace.ACEConfig()
    assert ace.anchor_list(["fish", "cup"], config)[:2] == ["circle", "square"]
    assert "fish" not in ace.anchor_list(["fish"], config) and len(ace.anchor_list(["fish"], config)) == 11
    with pytest.raises(ErasekitError, match="anchors="):
        ace.anchor_list(["zebra"], config)


def test_ace_relevance_is_the_ratio_of_classifier_probabilities(model, monkeypatch):
    """w_j = mean P(c | images of a_j) / mean P(c | images of c), each image classified once."""
    from erasekit import generation
    from erasekit.evaluation import classifiers

    names = ("circle", "fish", "cup")

    class Head(torch.nn.Module):  # the object head reads the concept off the first pixel: image k -> class k
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def predict(self, x):
            k = ((x[:, 0, 0, 0] + 1) / 2 * 10).round().long()
            logits = torch.nn.functional.one_hot(k, 3).float() * 2.0
            return logits, torch.zeros(len(x), 1)

    fake = classifiers.ImageClassifier(module=Head(), object_names=names, style_names=("neon",), image_size=4)
    monkeypatch.setattr(classifiers, "load_classifier", lambda folder=None: fake)

    def render(pipe, requests, sampling, **kw):
        k = names.index(requests[0].prompt.split()[1])
        return [np.full((4, 4, 3), k / 10, dtype=np.float32) for _ in requests]

    monkeypatch.setattr(generation, "render", render)
    w = ace.relevance_weights(model, ["fish"], ["circle", "cup"], ace.ACEConfig())
    p_own, p_other = torch.tensor(2.0).exp(), torch.tensor(1.0)
    own = p_own / (p_own + 2)  # softmax of (0, 2, 0) at class 1
    other = p_other / (p_own + 2)
    assert torch.allclose(w, torch.full((1, 2), float(other / own)), atol=1e-5)
    assert torch.equal(ace.relevance_weights(model, ["fish"], ["cup"], ace.ACEConfig(relevance="uniform")),
                       torch.ones(1, 1))  # fmt: skip
    with pytest.raises(ErasekitError, match="MiniCanvas"):
        ace.relevance_weights(model, ["fish"], ["zebra"], ace.ACEConfig())


def test_ace_patch_is_the_merged_low_rank_update(model):
    config = dict(iterations=2, ddim_steps=3, relevance="uniform", rank=2)
    patch = erasekit.erase(model, ["fish"], method="ace", concept_type="object", **config)
    unet = model.pipeline.unet
    linears = [k for k in patch.tensors if "attn2.to_v" in k or "attn1.to_q" in k]
    assert linears
    for key in linears:
        name = key.split("/", 1)[1]
        singular = torch.linalg.svdvals(
            patch.tensors[key].double() - unet.get_parameter(name).detach().double()
        )
        assert singular[2] < 1e-3 * singular[0], key  # rank 2, up to float32 rounding of W + ΔW


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="warmup"):
        doco.DoCoConfig(iterations=10, warmup=9)
    with pytest.raises(ValueError, match="surgery"):
        doco.DoCoConfig(prior=False)
    assert dataclasses.replace(doco.DoCoConfig(prior=False, surgery="none")).surgery == "none"
    with pytest.raises(ValueError, match="prior_weight"):
        ace.ACEConfig(prior_weight=1.5)
    with pytest.raises(ErasekitError, match="surgery"):
        make_config("doco", surgery="pcgrad")
    assert make_config("doco", concept_type="style").disc_lr == 5e-4
    assert make_config("doco", concept_type="object").disc_lr == 1e-4
    assert make_config("doco", concept_type="nsfw").anchor == "clothed"
