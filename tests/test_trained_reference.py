"""The trained baselines' ``paper`` presets against plain code written from the authors' releases (issue 13).

AdvUnlearn (OPTML-Group/AdvUnlearn), few-shot TE (fmp453/few-shot-erasing), ESD's bf16 preset
(rohitgandikota/erasing ``esd_sd.py``) and HiRM-S's steps. Each reference below is written out here, apart
from the methods' own code, and the methods must match it to a stated tolerance on a tiny seeded model.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit import progress
from erasekit.denoising import encode_prompts, sample_until
from erasekit.methods.common import frozen, trained_in_place
from erasekit.registry import make_config

progress.set_enabled(False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def unet_eps(pipe, x, t, cond):
    return pipe.unet(x, t, encoder_hidden_states=cond).sample


def assert_same_updates(ours: dict, plain: dict, base: dict, lr: float) -> None:
    """Two trainings' updates ``{name: tensor}`` agree: per tensor, 99% of the elements to 1% of lr; over all,
    to 2% in norm.

    Adam's first steps are about ±lr per weight whatever the gradient's size, so a weight whose gradient is
    almost zero flips with float noise (a batched versus a single UNet call); those few are let through.
    """
    for n in plain:
        a, b = ours[n] - base[n], plain[n] - base[n]
        assert ((a - b).abs() <= 0.01 * lr).float().mean() >= 0.99, (n, (a - b).abs().max())
    a = torch.cat([(ours[n] - base[n]).flatten() for n in plain])
    b = torch.cat([(plain[n] - base[n]).flatten() for n in plain])
    assert (a - b).norm() <= 0.02 * b.norm()


# ---- AdvUnlearn ---------------------------------------------------------------------------------------------


def test_advunlearn_full_trains_the_blocks_and_final_norm_not_the_embeddings(model):
    from erasekit.methods.advunlearn import trainable_names

    enc = model.components["text_encoder"]
    names = set(trainable_names(enc, "full"))
    # the release's param_choices('text_encoder_full', component='all'): encoder.* and final_layer_norm.*
    expected = {n for n, _ in enc.named_parameters() if n.split(".")[0] in ("encoder", "final_layer_norm")}
    assert names == expected
    assert not any("embeddings" in n for n in names) and "final_layer_norm.weight" in names
    patch = erasekit.erase(
        model, ["circle"], "advunlearn", preset="paper", iterations=2, ddim_steps=3, retain_batch=2
    )
    keys = {k.removeprefix("text_encoder/") for k in patch.tensors}
    assert keys <= expected and "final_layer_norm.weight" in keys


def plain_advunlearn(pipe, concept, retain, names, steps, cfg):
    """Warm-up iterations of the release, written out: ESD target e0 − η(e_p − e0) and a retain term whose
    prompts each have their own x_t (same stopping step), Adam on ``names``. Returns (losses, new tensors)."""
    enc, g = pipe.text_encoder, torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        c, null, r_emb = (
            encode_prompts(pipe, [concept]),
            encode_prompts(pipe, [""]),
            encode_prompts(pipe, retain),
        )
    live = dict(enc.named_parameters())
    saved = {n: live[n].detach().clone() for n in names}
    opt, unseen, losses, old_losses = torch.optim.Adam([live[n] for n in names], lr=cfg.lr), [], [], []
    sample = dict(steps=cfg.ddim_steps, guidance=cfg.start_guidance, generator=g)
    with frozen(pipe.unet, enc):
        for n in names:
            live[n].requires_grad_(True)
        for _ in range(steps):
            torch.randint(1, (), generator=g)  # the concept draw (one concept)
            if len(unseen) < cfg.retain_batch:
                unseen = torch.randperm(len(retain), generator=g).tolist()
            pick, unseen = unseen[: cfg.retain_batch], unseen[cfg.retain_batch :]
            stop = int(torch.randint(0, cfg.ddim_steps, (), generator=g))
            x_t, t = sample_until(pipe, c, null, stop=stop, **sample)
            x_r, _ = sample_until(pipe, r_emb[pick], null.expand(len(pick), -1, -1), stop=stop, **sample)
            with torch.no_grad():
                e_p, e_0 = unet_eps(pipe, x_t, t, c), unet_eps(pipe, x_t, t, null)
                r_want = unet_eps(pipe, x_r, t, r_emb[pick])
            e_n = unet_eps(pipe, x_t, t, encode_prompts(pipe, [concept]))
            r_n = unet_eps(pipe, x_r, t, encode_prompts(pipe, [retain[j] for j in pick]))
            retain_term = cfg.retain_weight * F.mse_loss(r_n, r_want)
            loss = F.mse_loss(e_n, e_0 - cfg.negative_guidance * (e_p - e_0)) + retain_term
            old_losses.append((F.mse_loss(e_n, e_p - (e_p - e_0)) + retain_term).item())  # our former target
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        new = {n: live[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                live[n].copy_(saved[n])
    return losses, old_losses, new


def test_advunlearn_warmup_iterations_match_the_release_written_out(model):
    from erasekit.methods.advunlearn import train, trainable_names

    pipe = model.pipeline
    retain = ["a photo of dog", "a photo of house", "a photo of cup"]
    cfg = make_config(
        "advunlearn",
        "paper",
        "object",
        iterations=2,
        warmup_iterations=2,
        ddim_steps=4,
        lr=1e-3,
        retain_batch=2,
    )
    names = trainable_names(pipe.text_encoder, "full")
    with frozen(pipe.unet), trained_in_place(pipe.text_encoder, names) as params:
        ours = train(pipe, ["circle"], retain, cfg, params)
        new = {n: p.detach().clone() for n, p in params.items()}
    want, old, plain = plain_advunlearn(pipe, "circle", retain, names, 2, cfg)
    np.testing.assert_allclose(ours, want, rtol=1e-5)
    assert abs(ours[0] - old[0]) > 1e-3 * abs(old[0]), "the test cannot tell the two ESD targets apart"
    base = {n: p.detach() for n, p in pipe.text_encoder.named_parameters()}
    assert_same_updates(new, plain, base, cfg.lr)


def custom_encode(enc, embeds):
    """The release's CustomTextEncoder: CLIP's text transformer from input embeddings (+ positions, causal
    mask, blocks, final LayerNorm). ``embeds`` ``[B, 77, D]`` -> ``[B, 77, D]``."""
    core = getattr(enc, "text_model", enc)
    n = embeds.shape[1]
    mask = torch.full((n, n), torch.finfo(embeds.dtype).min).triu(1)[None, None]
    h = core.encoder(inputs_embeds=core.embeddings(inputs_embeds=embeds), attention_mask=mask)
    return core.final_layer_norm(h.last_hidden_state)


def plain_attack(pipe, ids, delta0, samples, lr, zero_grads=False):
    """The release's soft_prompt_attack ('pgd'): Adam on δ, ``loss.backward()`` with no ``zero_grad``, one sample
    per step; returns the δ the last step evaluated. ``ids`` ``[77]``: the prompt's tokens, placeholder at 1."""
    enc = pipe.text_encoder
    rows = enc.get_input_embeddings().weight[ids].detach()
    delta = delta0.clone().requires_grad_(True)
    opt, used = torch.optim.Adam([delta], lr=lr), None
    for x_t, t, want in samples:
        used = delta.detach().clone()
        if zero_grads:
            opt.zero_grad()
        cond = custom_encode(enc, torch.cat([rows[:1], delta, rows[2:]]).unsqueeze(0))
        F.mse_loss(unet_eps(pipe, x_t, t, cond), want).backward()
        opt.step()
    return used


def test_advunlearn_attack_is_adam_on_accumulated_gradients_with_a_fresh_sample_each_step(model):
    from erasekit.denoising import with_prefix
    from erasekit.methods.advunlearn import attack

    pipe, g = model.pipeline, torch.Generator().manual_seed(1)
    cfg = make_config("advunlearn", attack_steps=4, attack_lr=0.05)
    shape = (1, 4, 8, 8)
    samples = [
        (torch.randn(shape, generator=g), torch.tensor(100 + 200 * i), torch.randn(shape, generator=g))
        for i in range(4)
    ]
    prompt = with_prefix("circle", 1)
    ids = torch.tensor(pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids)
    delta0 = pipe.text_encoder.get_input_embeddings().weight[[7]].detach().clone()
    draws = iter(samples)
    with frozen(pipe.unet, pipe.text_encoder):
        table = pipe.text_encoder.get_input_embeddings().weight
        with torch.no_grad():  # the reference encoder is CLIP's own
            torch.testing.assert_close(
                custom_encode(pipe.text_encoder, table[ids][None]), encode_prompts(pipe, [prompt])
            )
        ours = attack(pipe, "circle", delta0, lambda: next(draws), cfg)
        want = plain_attack(pipe, ids, delta0, samples, 0.05)
        zeroed = plain_attack(pipe, ids, delta0, samples, 0.05, zero_grads=True)
    assert next(draws, None) is None, "one fresh sample per attack step"
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours, zeroed, rtol=1e-4, atol=1e-6), "the test cannot see the accumulation"
    assert not torch.equal(ours, delta0)


def test_advunlearn_retain_sets():
    from erasekit.methods.advunlearn import COCO_OBJECTS, retain_picks, retain_prompts
    from erasekit.minicanvas.world import OBJECT_NAMES, OBJECT_TEMPLATES
    from erasekit.models.families import FAMILIES

    tiny = types.SimpleNamespace(source="/some/folder", path="/some/folder", family=FAMILIES["sd15"])
    coco = retain_prompts(tiny, ["circle"], make_config("advunlearn"))
    assert len(coco) == len(COCO_OBJECTS) == 243 and coco[:2] == ["a photo of chair", "a photo of fridge"]
    world = retain_prompts(tiny, ["circle"], make_config("advunlearn", retain_set="minicanvas"))
    assert world == [t.format(object=o) for o in OBJECT_NAMES if o != "circle" for t in OBJECT_TEMPLATES]
    canvas = types.SimpleNamespace(source="/retrained", path="/retrained", family=FAMILIES["minicanvas"])
    assert (
        retain_prompts(canvas, ["circle"], make_config("advunlearn")) == world
    )  # auto: the world's own objects
    assert retain_prompts(tiny, ["x"], make_config("advunlearn", retain=("dog",))) == ["a photo of dog"]
    picks = retain_picks(7, 3, torch.Generator().manual_seed(0))
    first, second, third = next(picks), next(picks), next(picks)
    assert len(set(first + second)) == 6  # without replacement within a pass
    assert len(third) == 3 and len(set(third)) == 3  # one prompt was left: a new pass starts


# ---- few-shot TE --------------------------------------------------------------------------------------------


def noise_images(concept: str, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


def plain_fewshot(pipe, concept, shots, cfg, names):
    """The release's train.py written out: flips, sampled VAE latents, a shuffled DataLoader of batch 2 per
    epoch, one template per image, -MSE, Adam(lr, (0.9, 0.98), 1e-6, 1e-8). Returns (losses, new tensors)."""
    from diffusers import DDPMScheduler
    from PIL import Image

    g, enc = torch.Generator().manual_seed(cfg.seed), pipe.text_encoder
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    shots = [im[:, ::-1] if float(torch.rand((), generator=g)) < 0.5 else im for im in shots]
    x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((size, size), Image.BICUBIC))
                  for im in shots])  # fmt: skip
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    live = dict(enc.named_parameters())
    saved = {n: live[n].detach().clone() for n in names}
    opt = torch.optim.Adam(
        [live[n] for n in names], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-8
    )
    losses = []
    with frozen(pipe.unet, pipe.vae, enc):
        for n in names:
            live[n].requires_grad_(True)
        orders = [torch.randperm(len(shots), generator=g).tolist() for _ in range(cfg.epochs)]  # the shuffles
        for order in orders:
            for b in range(0, len(order), 2):
                idx = order[b : b + 2]
                tpl = torch.randint(len(cfg.templates), (len(idx),), generator=g).tolist()
                x0 = lat[idx]
                t = torch.randint(0, 1000, (len(idx),), generator=g)
                noise = torch.randn(x0.shape, generator=g)
                pred = unet_eps(pipe, scheduler.add_noise(x0, noise, t), t,
                                encode_prompts(pipe, [cfg.templates[k].format(concept) for k in tpl]))  # fmt: skip
                loss = -F.mse_loss(pred, noise)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(-loss.item())
        new = {n: live[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                live[n].copy_(saved[n])
    return losses, new


def test_fewshot_paper_settings(model, monkeypatch):
    from erasekit.methods.fewshot_te import OBJECT_TEMPLATES, STYLE_TEMPLATES, erase_fewshot_te

    style, obj = make_config("fewshot-te", "paper", "style"), make_config("fewshot-te", "paper", "object")
    assert style.templates == STYLE_TEMPLATES and obj.templates == OBJECT_TEMPLATES
    assert (len(STYLE_TEMPLATES), len(OBJECT_TEMPLATES)) == (19, 27)
    assert STYLE_TEMPLATES[0] == "a painting in the style of {}" and OBJECT_TEMPLATES[0] == "a photo of a {}"
    made, batches = [], []

    class Recording(torch.optim.Adam):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            made.append(self.defaults)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    hook = model.pipeline.unet.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        erase_fewshot_te(model, ["circle"], obj, images=noise_images)
    finally:
        hook.remove()
    assert batches == [2] * 10  # 4 images, batch 2, 5 epochs
    (opt,) = made
    assert (opt["lr"], opt["betas"], opt["eps"], opt["weight_decay"]) == (1e-5, (0.9, 0.98), 1e-6, 1e-8)
    assert not opt["decoupled_weight_decay"]  # Adam's L2 decay, not AdamW's


def test_fewshot_matches_the_release_written_out(model):
    from erasekit.methods.fewshot_te import erase_fewshot_te, trainable_names

    pipe = model.pipeline
    cfg = make_config("fewshot-te", "paper", "style", epochs=2, lr=1e-3)
    names = trainable_names(pipe.text_encoder)
    losses, plain = plain_fewshot(pipe, "circle", noise_images("circle", 4, cfg.seed), cfg, names)
    assert len(losses) == 4  # 4 images in batches of 2, two epochs
    patch = erase_fewshot_te(model, ["circle"], cfg, images=noise_images)
    base = {n: p.detach() for n, p in pipe.text_encoder.named_parameters()}
    ours = {n: patch.tensors[f"text_encoder/{n}"] for n in names}
    assert_same_updates(ours, plain, base, cfg.lr)


# ---- ESD bf16 -----------------------------------------------------------------------------------------------


def test_esd_bf16_preset_trains_in_bfloat16(model):
    before = {k: v.clone() for k, v in model.components["unet"].state_dict().items()}
    run = dict(iterations=1, ddim_steps=3)
    bf16 = erasekit.erase(model, ["circle"], "esd-x", preset="bf16", **run)
    fp32 = erasekit.erase(model, ["circle"], "esd-x", preset="paper", **run)
    assert all(torch.equal(v, model.components["unet"].state_dict()[k]) for k, v in before.items())
    assert (
        make_config("esd-x", "bf16").train_dtype == "bfloat16"
        and make_config("esd-x").train_dtype == "float32"
    )
    assert bf16.tensors.keys() == fp32.tensors.keys()
    big = moved = small_moved = 0
    for key, new in bf16.tensors.items():
        w0 = before[key.removeprefix("unet/")]
        assert torch.equal(new, new.bfloat16().float()), f"{key} holds values a bfloat16 cannot"
        start = w0.bfloat16().float()
        # one Adam step moves a weight by at most about lr = 5e-5: below half a bf16 ulp when |w| > 2^-6
        large = start.abs() > 2**-6
        assert torch.equal(new[large], start[large]), f"{key}: a large weight moved in bf16"
        step32 = fp32.tensors[key] - w0
        assert step32.abs().max() <= 5e-5 * 1.01
        big += int(large.sum())
        moved += int((step32[large] != 0).sum())
        small_moved += int((new[~large] != start[~large]).sum())
    assert big > 0 and moved > 0.9 * big, "in fp32 the same large weights do move"
    assert small_moved > 0, "small bf16 weights still train"


# ---- HiRM-S -------------------------------------------------------------------------------------------------


def test_hirm_s_paper_steps_are_the_paper_notes():
    for kind, steps in {"style": 30, "object": 15, "nsfw": 25}.items():
        assert make_config("hirm-s", "paper", kind).steps == steps
        assert make_config("hirm-s", "default", kind) == make_config("hirm-s", "paper", kind)
    assert [make_config("hirm-r", "paper", k).steps for k in ("style", "object", "nsfw")] == [20, 15, 50]
