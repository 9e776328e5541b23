"""Receler: the attention maps, the mask, the regulariser and the loss against plain code; the adversary's rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.denoising import encode_prompts
from erasekit.hooked import AddedModule, HookedPatch, load_erasure
from erasekit.methods.receler import (
    Erasers,
    ReceleConfig,
    attention_probs,
    background_penalty,
    concept_mask,
    concept_tokens,
    cross_attentions,
    new_eraser,
    receler_loss,
    with_rows,
)
from tests.fixtures.evaluation_tiny import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def trained_looking(unet, g) -> dict:
    """Erasers with a non-zero ``up``, so they change the model."""
    erasers = {}
    for name in cross_attentions(unet):
        dim = unet.get_submodule(name).to_out[0].out_features
        e = new_eraser(dim, 4, g)
        with torch.no_grad():
            e.up.weight.copy_(0.3 * torch.randn(e.up.weight.shape, generator=g))
        erasers[name] = e.requires_grad_(True)
    return erasers


def test_attention_probs_are_the_processors(model):
    unet = model.components["unet"]
    attn = unet.get_submodule(cross_attentions(unet)[0])
    g = torch.Generator().manual_seed(0)
    x, ctx = (
        torch.randn(2, 16, attn.query_dim, generator=g),
        torch.randn(2, 77, attn.cross_attention_dim, generator=g),
    )
    probs = attention_probs(attn, x, ctx)  # [B, h, HW, L]
    v = attn.to_v(ctx).view(2, 77, attn.heads, -1).transpose(1, 2)
    mixed = (probs @ v).transpose(1, 2).reshape(2, 16, -1)
    with torch.no_grad():
        assert torch.allclose(attn.to_out[0](mixed), attn(x, encoder_hidden_states=ctx), atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, attn.heads, 16))


def test_mask_and_background_penalty_match_plain_code():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 2, 64, 77, generator=g), torch.rand(2, 2, 16, 77, generator=g),
            torch.rand(2, 2, 16, 77, generator=g), torch.rand(2, 2, 4, 77, generator=g)]  # fmt: skip
    mask = concept_mask(maps, [1, 2], (8, 8), 0.4, 0)  # 8x8, 4x4, 4x4, 2x2: the 4x4 maps
    plain = (maps[1][..., 1:3].mean(-1).mean(1) + maps[2][..., 1:3].mean(-1).mean(1)) / 2  # [B, 16]
    for b in range(2):
        row = plain[b]
        norm = (row - row.min()) / (row.max() - row.min())
        assert torch.equal(mask[b, 0].flatten(), (norm >= 0.4).float())
    outs = [torch.randn(2, 64, 8, generator=g), torch.randn(2, 4, 8, generator=g)]
    got = background_penalty(outs, mask, (8, 8))
    terms = []
    for e, side in zip(outs, (8, 2)):
        m = mask[:, 0].repeat_interleave(2, 1).repeat_interleave(2, 2) if side == 8 else mask[:, 0, ::2, ::2]
        flip = 1 - m.flatten(1)
        terms.append(sum(float((e[b, i] ** 2).mean()) * float(flip[b, i]) for b in range(2) for i in range(e.shape[1]))
                     / (float(flip.sum()) + 1e-9))  # fmt: skip
    assert float(got) == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_the_loss_against_plain_code(model):
    pipe = model.pipeline
    unet = pipe.unet
    g = torch.Generator().manual_seed(1)
    erasers = trained_looking(unet, g)
    config = ReceleConfig(negative_guidance=1.5, reg_weight=0.5, mask_threshold=0.2, adversary="inert")
    c, null = encode_prompts(pipe, ["fish"]), encode_prompts(pipe, [""])
    tokens = concept_tokens(pipe, "fish")
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(600)
    with torch.no_grad(), Erasers(unet, erasers).attached() as live:
        loss = receler_loss(live, x, t, c, null, tokens, None, config)
    # plain code: frozen predictions and maps, then the erasers as plain forward hooks
    maps = []

    def record(mod, args, kwargs):
        maps.append(attention_probs(mod, args[0], kwargs["encoder_hidden_states"]))

    names = cross_attentions(unet)
    with torch.no_grad():
        e_null = unet(x, t, encoder_hidden_states=null).sample
        handles = [unet.get_submodule(n).register_forward_pre_hook(record, with_kwargs=True) for n in names]
        e_c = unet(x, t, encoder_hidden_states=c).sample
        for h in handles:
            h.remove()
        outs = []

        def add(e):
            def hook(mod, args, out):
                outs.append(e(out))
                return out + outs[-1]

            return hook

        handles = [unet.get_submodule(n).register_forward_hook(add(erasers[n])) for n in names]
        e_n = unet(x, t, encoder_hidden_states=c).sample
        for h in handles:
            h.remove()
    mask = concept_mask(maps, tokens, (8, 8), 0.2, 0)
    want = F.mse_loss(e_n, e_null - 1.5 * (e_c - e_null)) + 0.5 * background_penalty(outs, mask, (8, 8))
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_the_intended_adversary_reaches_the_unet(model):
    pipe = model.pipeline
    unet = pipe.unet
    g = torch.Generator().manual_seed(2)
    erasers = trained_looking(unet, g)
    c, null = encode_prompts(pipe, ["fish"]), encode_prompts(pipe, [""])
    tokens = concept_tokens(pipe, "fish")
    rows = torch.rand(1, 3, c.shape[-1], generator=g).requires_grad_(True)
    start = rows.detach().clone()
    opt = torch.optim.Adam([rows], lr=0.1, weight_decay=0.1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(600)
    config = ReceleConfig(adv_rows=3, adv_iterations=1, reg_weight=0.0)
    with Erasers(unet, erasers).attached() as live:
        adv = receler_loss(live, x, t, c, null, tokens, (rows, opt), config).detach()
        clean = receler_loss(live, x, t, c, null, tokens, None, config)
        with torch.no_grad():
            with live.state(on=False):
                e_null, e_c = (unet(x, t, encoder_hidden_states=e).sample for e in (null, c))
            with live.state(on=True):
                e_adv = unet(x, t, encoder_hidden_states=with_rows(c, start, tokens[-1] + 1)).sample
    # one pass: the eraser loss sees the rows as they were, written right after the concept's tokens
    assert float(adv) == pytest.approx(float(F.mse_loss(e_adv, 2 * e_null - e_c)), rel=1e-5)
    assert float(adv) != pytest.approx(float(clean)) and not torch.equal(rows.detach(), start)
    placed, n = with_rows(c, start, tokens[-1] + 1), tokens[-1]
    assert torch.equal(placed[:, : n + 1], c[:, : n + 1]) and torch.equal(placed[:, n + 4 :], c[:, n + 4 :])
    assert torch.equal(placed[:, n + 1 : n + 4], start)


def test_untrained_erasers_are_the_identity_and_the_artifact_round_trips(model, tmp_path):
    art = erasekit.erase(model, ["fish"], "receler", concept_type="object", iterations=1, ddim_steps=3,
                         adv_iterations=1)  # fmt: skip
    assert {m.type for m in art.modules} == {"adapter_eraser"} and not art.hooks
    unet = model.components["unet"]
    assert [m.attach for m in art.modules] == [f"unet/{n}" for n in cross_attentions(unet)]
    assert art.modules[0].config == {"dim": 64, "rank": 26}  # 0.4 x the narrowest width (64), as 128 of 320
    g = torch.Generator().manual_seed(0)
    fresh = HookedPatch(modules=tuple(
        AddedModule.attached_to(model, m.attach, m.type, m.config, new_eraser(m.config["dim"], 26, g).state_dict())
        for m in art.modules))  # fmt: skip
    loaded = load_erasure(fresh.save(tmp_path / "r"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(model.pipeline, ["a fish"])
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=cond).sample
        with loaded.applied(model):
            erased = unet(x, 500, encoder_hidden_states=cond).sample
    assert torch.equal(plain, erased)  # up = 0: E(y) = 0 exactly


def test_bad_configs_are_one_line_errors(model):
    from erasekit.errors import ErasekitError
    from erasekit.registry import make_config

    for bad, match in (({"adversary": "bug"}, "adversary"), ({"mask_threshold": 1.0}, "mask_threshold"),
                       ({"adv_rows": 0}, "adv_rows")):  # fmt: skip
        with pytest.raises(ErasekitError, match=match):
            make_config("receler", **bad)
    assert make_config("receler", "release").adversary == "inert"
    with pytest.raises(ErasekitError, match="overrun"):
        erasekit.erase(model, ["fish"], "receler", adv_rows=76, iterations=1, ddim_steps=2)
