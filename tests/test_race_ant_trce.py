"""RACE, ANT and TRCE on the tiny SD1.x pipeline: each method's defining property against plain code.

The plain code here reads the releases (chkimmmmm/R.A.C.E. ``train-scripts/train-esd.py``, lileyang1210/ANT
``Single/train-scripts/train_ant_single.py`` and ``generate_mask.py``, ddgoodgood/TRCE ``src/cfr_utils.py`` and
``run_trce_stage2.py``) with torch, diffusers' DDIM scheduler and the MiniCanvas world as data; it calls nothing
in ``erasekit.methods`` except the function under test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

import erasekit
from erasekit import progress
from erasekit.errors import ErasekitError
from erasekit.minicanvas import world
from erasekit.registry import make_config
from tests.fixtures.evaluation_tiny import encode, one_thread  # noqa: F401

progress.set_enabled(False)


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


# ---- plain building blocks ---------------------------------------------------------------------------


def eps(pipe, x, t, cond, weights=None):
    """ε(x, t, cond) with some weights swapped in (``{param name: tensor}``)."""
    if weights:
        return torch.func.functional_call(pipe.unet, weights, (x, t), {"encoder_hidden_states": cond}).sample
    return pipe.unet(x, t, encoder_hidden_states=cond).sample


def ddim_latents(pipe, noise, cond, null, steps, stops, guidance):
    """A CFG DDIM trajectory from ``noise``; the latents after each of ``stops`` steps."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x, out = noise, {0: noise}
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[: max(stops)]):
            e_u, e_c = eps(pipe, torch.cat([x, x]), t, torch.cat([null, cond])).chunk(2)
            x = scheduler.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
            out[i + 1] = x
    return [out[s] for s in stops], scheduler.timesteps


def kv_names(unet, projections=("to_k",)) -> list[str]:
    return [
        n
        for n, _ in unet.named_parameters()
        if "attn2" in n.split(".") and n.split(".")[-2] in projections and n.endswith("weight")
    ]


def first_adam_step(w, grad, lr):
    """Adam's first update from zero moments: w − lr · g / (|g| + 1e-8)."""
    return w - lr * grad / (grad.abs() + 1e-8)


# ---- RACE --------------------------------------------------------------------------------------------


def plain_pgd(pipe, x, t, clean, target, eps_, steps, g):
    """train-esd.py's pgd_attack: random start, 10 signed steps of ε/4 on −MSE, clipped to the ball and range."""
    lo, hi = clean.min(), clean.max()
    adv = torch.clamp(clean + (torch.rand(clean.shape, generator=g) * 2 - 1) * eps_, lo, hi)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = -F.mse_loss(target, eps(pipe, x, t, adv))
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + eps_ / 4 * grad.sign()
        adv = torch.clamp(clean + torch.clamp(adv - clean, -eps_, eps_), lo, hi).detach()
    return adv


def test_race_pgd_is_the_release_pgd_and_stays_in_the_ball(model):
    from erasekit.methods.race import pgd_attack

    pipe = model.pipeline
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn((1, 4, 8, 8), generator=gen), torch.randn((1, 4, 8, 8), generator=gen)
    clean, t = encode(pipe, ["fish"]), torch.tensor(500)
    config = make_config("race", epsilon=0.1, pgd_steps=10)
    pipe.unet.requires_grad_(False)
    got = pgd_attack(pipe.unet, {}, x, t, clean, target, config, torch.Generator().manual_seed(7))
    want = plain_pgd(pipe, x, t, clean, target, 0.1, 10, torch.Generator().manual_seed(7))
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - clean).abs().max() <= 0.1 + 1e-6
    assert got.min() >= clean.min() and got.max() <= clean.max()
    with torch.no_grad():
        assert F.mse_loss(eps(pipe, x, t, got), target) < F.mse_loss(eps(pipe, x, t, clean), target)


def test_race_step_feeds_the_attacked_condition_to_the_old_esd_target(model):
    """One adversarial iteration equals plain code: trained-model sampling, PGD toward x_T, the target
    ε*(∅) − η(ε*(c) − ε*(∅)) regressed from ε_θ(x_t, c + δ); Adam's first step is −lr · g / (|g| + ε)."""
    pipe, lr = model.pipeline, 1e-3
    patch = erasekit.erase(
        model, ["fish"], "race", esd_iterations=0, iterations=1, ddim_steps=4, pgd_steps=3,
        parameters="attn2-kv", lr=lr, seed=5,
    )  # fmt: skip
    unet = pipe.unet
    g = torch.Generator().manual_seed(5)
    stop = int(torch.randint(0, 4, (), generator=g))
    noise = torch.randn((1, 4, 8, 8), generator=g)
    c, null = encode(pipe, ["fish"]), encode(pipe, [""])
    (x,), timesteps = ddim_latents(pipe, noise, c, null, 4, [stop], 3.0)
    t = timesteps[stop]
    unet.requires_grad_(False)
    adv = plain_pgd(pipe, x, t, c, noise, 0.1, 3, g)
    with torch.no_grad():
        e_0, e_c = eps(pipe, x.expand(2, -1, -1, -1), t, torch.cat([null, c])).chunk(2)
    target = e_0 - 1.0 * (e_c - e_0)
    names = kv_names(unet, ("to_k", "to_v"))
    weights = {n: unet.get_parameter(n).detach().clone().requires_grad_(True) for n in names}
    errors = {}
    for label, cond in (("attacked", adv), ("clean", c)):
        grads = torch.autograd.grad(
            F.mse_loss(eps(pipe, x, t, cond, weights), target), list(weights.values())
        )
        errors[label] = max(
            float((patch.tensors[f"unet/{n}"] - first_adam_step(weights[n].detach(), grad, lr)).abs().max())
            for n, grad in zip(names, grads)
        )
    assert errors["attacked"] < 0.02 * lr < 0.5 * lr < errors["clean"], errors


def test_race_lasso_is_the_release_l1_sum():
    from erasekit.methods.race import lasso_penalty

    a = {"x": torch.tensor([1.0, -2.0]), "y": torch.tensor([[0.5]])}
    b = {"x": torch.tensor([0.0, 0.0]), "y": torch.tensor([[0.0]])}
    assert torch.isclose(lasso_penalty(a, b), torch.tensor(1.5 + 0.5))


# ---- ANT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["largest", "smallest"])
def test_ant_mask_keeps_half_by_rank(keep):
    from erasekit.methods.ant import keep_mask

    sal = torch.randn(7, 9, generator=torch.Generator().manual_seed(0)).abs()
    got = keep_mask(sal, 0.5, keep)
    k = int(63 * 0.5)
    ranked = sal.flatten().sort(descending=keep == "largest").values
    assert got.sum() == k
    if keep == "largest":
        assert sal[got].min() >= ranked[k - 1] and sal[~got].max() <= ranked[k - 1]
    else:  # generate_mask.py: ranks < int(n · threshold)
        assert sal[got].max() <= ranked[k - 1] and sal[~got].min() >= ranked[k - 1]


@pytest.mark.parametrize("phase", ["early", "late"])
def test_ant_phases_split_the_schedule_at_the_switch(phase):
    from erasekit.methods.ant import phase_stops

    config = make_config("ant", positive_phase=phase, switch_step=7, ddim_steps=50)
    draws = [phase_stops(config, torch.Generator().manual_seed(i)) for i in range(200)]
    if phase == "early":  # the first 7 steps from the noise keep the guidance direction
        assert all(p < 7 <= m for p, m in draws)
    else:  # the release's compvis indexing: t_enc < 7 counts from the clean end
        assert all(m < 43 <= p for p, m in draws)
    assert len({p for p, _ in draws}) == 7


@pytest.mark.parametrize("preserve_grad", [True, False])
def test_ant_loss_gradient_matches_plain_code(model, preserve_grad):
    from erasekit.methods.ant import ant_loss
    from erasekit.methods.common import trainable_copies

    pipe, unet = model.pipeline, model.pipeline.unet
    config = make_config(
        "ant", ddim_steps=8, switch_step=3, preserve_grad=preserve_grad, negative_guidance=1.5, alpha2=0.5
    )
    names = kv_names(unet)
    c, null = encode(pipe, ["fish"]), encode(pipe, [""])
    unet.requires_grad_(False)
    params = trainable_copies(unet, names)
    loss = ant_loss(pipe, params, {"c": c, "null": null}, config, torch.Generator().manual_seed(3))
    got = torch.autograd.grad(loss, list(params.values()))

    g = torch.Generator().manual_seed(3)
    stops = [int(torch.randint(0, 3, (), generator=g)), int(torch.randint(3, 8, (), generator=g))]
    noise = torch.randn((1, 4, 8, 8), generator=g)
    (z_p, z_m), timesteps = ddim_latents(pipe, noise, c, null, 8, stops, 3.0)
    weights = {n: unet.get_parameter(n).detach().clone().requires_grad_(True) for n in names}
    terms = []
    both = torch.cat([c, null])
    for z, s, sign in ((z_p, stops[0], 1.0), (z_m, stops[1], -1.0)):
        t, z2 = timesteps[s], z.expand(2, -1, -1, -1)
        with torch.no_grad():
            e_p, e_0 = eps(pipe, z2, t, both).chunk(2)
        if preserve_grad:
            e_n, e_n0 = eps(pipe, z2, t, both, weights).chunk(2)
        else:  # the release computes ε_θ(z, ∅) under no_grad
            e_n = eps(pipe, z, t, c, weights)
            with torch.no_grad():
                e_n0 = eps(pipe, z, t, null, weights)
        terms += [F.mse_loss(e_n, e_0 + sign * 1.5 * (e_p - e_0)), F.mse_loss(e_0, e_n0)]
    l1, l2, l3, l4 = terms
    total = l3 + 0.5 * l4 + 1.0 * (l1 + 0.5 * l2)
    assert torch.isclose(loss, total, rtol=1e-5)
    want = torch.autograd.grad(total, list(weights.values()), allow_unused=True)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


def test_ant_trains_only_inside_the_intersected_saliency_mask(model):
    from erasekit.methods.ant import saliency_mask, trainable_names
    from erasekit.methods.common import frozen

    pipe = model.pipeline
    config = make_config(
        "ant", parameters="attn2", iterations=2, ddim_steps=4, switch_step=2, mask_iterations=1,
        mask_seeds=(1, 2), lr=1e-3,
    )  # fmt: skip
    patch = erasekit.erase(model, ["fish"], "ant", config=config)
    names = trainable_names(pipe.unet, "attn2")
    with frozen(pipe.unet, pipe.text_encoder):
        each = [
            saliency_mask(pipe, names, ["fish"], dataclasses.replace(config, mask_seeds=(s,))) for s in (1, 2)
        ]
    mask = {n: each[0][n] & each[1][n] for n in names}
    moved = 0
    for n in names:
        assert each[0][n].sum() == int(each[0][n].numel() * 0.5)
        new = patch.tensors.get(f"unet/{n}", pipe.unet.get_parameter(n).detach())
        delta = new - pipe.unet.get_parameter(n).detach()
        assert torch.all(delta[~mask[n]] == 0), n
        moved += int((delta[mask[n]] != 0).sum())
    assert moved > 0


# ---- TRCE --------------------------------------------------------------------------------------------


def plain_world_pairs(name: str) -> list[tuple[str, str]]:
    """The object's names in every world caption naming it, and the same captions with its category."""
    info = world.concept_info(name)
    names = (info.name, *info.synonyms)
    captions = [t.replace("{object}", "{o}") for t in world.OBJECT_TEMPLATES]
    captions += [
        t.replace("{object}", "{o}").replace("{style}", s)
        for t in world.FULL_TEMPLATES
        for s in world.STYLE_NAMES
    ]
    return [(c.replace("{o}", n), c.replace("{o}", info.category)) for n in names for c in captions]


def first_eos_rows(pipe, texts):
    emb = encode(pipe, texts).double()
    rows = [pipe.tokenizer(t).input_ids.index(pipe.tokenizer.eos_token_id) for t in texts]
    return emb[torch.arange(len(texts)), torch.tensor(rows)]


def test_trce_world_pairs_and_errors(model):
    from erasekit.methods.trce_stage1 import stage1_pairs

    pairs = stage1_pairs(["fish"], make_config("trce", concept_type="object"))
    assert pairs == plain_world_pairs("fish") and len(pairs) == 3 * (2 + 6 * 12)
    assert ("A fish image in neon style.", "A animal image in neon style.") in pairs
    with pytest.raises(ErasekitError, match="safe concept"):
        erasekit.erase(model, ["a teapot"], "trce", epochs=0)
    with pytest.raises(ErasekitError, match="preserve prompts"):
        erasekit.erase(model, ["a teapot"], "trce", epochs=0, safe="a kettle")


def test_trce_stage1_is_the_release_closed_form(model):
    """cfr_utils.closed_form_refinement with weights [0,1,0,0], λ 0, cache s² · Σ/3e4 (our world captions
    weighed like COCO's 616,767 × 77 rows): W* = (W Vᵀ C / n + W K)(Cᵀ C / n + K)⁻¹ on first-EoT rows."""
    pipe = model.pipeline
    patch = erasekit.erase(model, ["fish"], "trce", concept_type="object", epochs=0)
    pairs = plain_world_pairs("fish")
    c, v = first_eos_rows(pipe, [m for m, _ in pairs]), first_eos_rows(pipe, [s for _, s in pairs])
    caps = [
        t.format(object=o, style=s)
        for t in world.FULL_TEMPLATES
        for o in world.OBJECT_NAMES
        if o != "fish"
        for s in world.STYLE_NAMES
    ]
    caps += [t.format(object=o) for t in world.OBJECT_TEMPLATES for o in world.OBJECT_NAMES if o != "fish"]
    caps += [t.format(style=s) for t in world.STYLE_TEMPLATES for s in world.STYLE_NAMES]
    rows = torch.cat(
        [encode(pipe, caps[i : i + 256]).double().reshape(-1, c.shape[1]) for i in range(0, len(caps), 256)]
    )
    k = 0.01**2 * 616_767 * 77 / 3e4 * rows.T @ rows / rows.shape[0]
    n = len(pairs)
    assert {k.split("/", 1)[1] for k in patch.tensors} == set(kv_names(pipe.unet, ("to_k", "to_v")))
    for key, got in patch.tensors.items():
        w = pipe.unet.get_parameter(key.split("/", 1)[1]).detach().double()
        want = (w @ v.T @ c / n + w @ k) @ torch.linalg.pinv(c.T @ c / n + k, hermitian=True)
        assert (got.double() - want).norm() / want.norm() < 1e-5, key
        assert (c @ got.double().T - v @ w.T).norm() < 0.5 * (c @ w.T - v @ w.T).norm()


def test_trce_hinge_is_the_release_hinge(model):
    from erasekit.methods.trce import hinge_loss

    pipe, unet = model.pipeline, model.pipeline.unet
    config = make_config("trce", guidance=15.0, margin=0.01, beta=1.0)
    emb = {
        "mal": encode(pipe, ["a photo of fish"]),
        "safe": encode(pipe, ["a photo of animal"]),
        "null": encode(pipe, [""]),
    }
    z, t = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor(801)
    names = kv_names(unet, ("to_q",))
    weights = {
        n: unet.get_parameter(n).detach() * 1.5 for n in names
    }  # a trained model other than the reference
    with torch.no_grad():
        got = hinge_loss(unet, weights, z, t, emb, config)
        neg, safe, un = (eps(pipe, z, t, emb[k]) for k in ("mal", "safe", "null"))
        prefer, reject = safe + 15 * (safe - un), neg + 15 * (neg - un)
        want = 0.0
        for cond in ("mal", "null"):
            own = eps(pipe, z, t, emb[cond], weights)
            want += torch.clamp(F.mse_loss(own, prefer) - F.mse_loss(own, reject) + 0.01, min=0) / 2
    assert torch.isclose(got, want, rtol=1e-4, atol=1e-6)


def test_trce_stage2_trains_attn1_and_to_q_and_accumulates_only_in_release(model):
    from erasekit.methods.common import frozen
    from erasekit.methods.trce import stage2, stage2_names

    unet = model.pipeline.unet
    release = [n for n, _ in unet.named_parameters() if "attn1" in n or ("attn2" in n and "to_q" in n)]
    assert sorted(stage2_names(unet)) == sorted(release)
    pairs = [("a photo of fish", "a photo of animal")]
    tiny = {"trajectories": 1, "reg_trajectories": 2, "ddim_steps": 4, "early_steps": 1, "lr": 1e-3}

    def run(preset, epochs):
        config = make_config("trce", preset, "object", epochs=epochs, **tiny)
        with frozen(unet, model.pipeline.text_encoder):
            return stage2(model.pipeline, {}, pairs, config)

    one, one_release = run("paper", 1), run("release", 1)
    assert set(one) == set(release)
    assert all(torch.equal(one[k], one_release[k]) for k in one)  # one step: nothing accumulated yet
    two, two_release = run("paper", 2), run("release", 2)
    assert any(not torch.equal(two[k], two_release[k]) for k in two)


@pytest.mark.parametrize(
    ("method", "bad"),
    [
        ("race", {"epsilon": 0.0}),
        ("race", {"parameters": "attn3"}),
        ("ant", {"switch_step": 50}),
        ("ant", {"mask_keep": "middle"}),
        ("trce", {"early_steps": 50}),
        ("trce", {"templates": 16}),
    ],
)
def test_bad_configs_give_one_line_errors(method, bad):
    with pytest.raises(ErasekitError) as err:
        make_config(method, **bad)
    assert "\n" not in str(err.value)
