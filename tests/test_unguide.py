"""UnGuide: the loss, the gate's distance and the mix against plain code; the hooked artifact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.denoising import encode_prompts
from erasekit.hooked import AddedModule, HookedPatch, HookSpec
from erasekit.methods.common import attn2_linears
from erasekit.methods.unguide import UnGuideConfig, unguide_loss
from erasekit.patch import Patch
from tests.fixtures.evaluation_tiny import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def pairs(model, g) -> dict:
    """Trained-looking rank-1 pairs ``{name: (A [1, in], B [out, 1])}`` on every attn2 to_k / to_v."""
    unet = model.components["unet"]
    out = {}
    for name in attn2_linears(unet, ("to_k", "to_v")):
        lin = unet.get_submodule(name)
        out[name] = (
            torch.randn(1, lin.in_features, generator=g),
            0.2 * torch.randn(lin.out_features, 1, generator=g),
        )
    return out


def artifact(model, ab, gate) -> HookedPatch:
    unet = model.components["unet"]
    modules = []
    for name, (a, b) in ab.items():
        lin = unet.get_submodule(name)
        cfg = {"layer": "linear", "in_features": lin.in_features, "out_features": lin.out_features, "rank": 1,
               "scale": 8.0}  # fmt: skip
        modules.append(AddedModule.attached_to(model, f"unet/{name}", "low_rank_adapter", cfg,
                                               {"down.weight": a, "up.weight": b}))  # fmt: skip
    hook = HookSpec(name="unguide", kind="guidance_mix", config=gate, gates=tuple(m.name for m in modules))
    return HookedPatch(modules=tuple(modules), hooks=(hook,))


def merged(model, ab) -> Patch:
    unet = model.components["unet"]
    return Patch.from_tensors(model, "unet", {f"{n}.weight": unet.get_submodule(n).weight + 8.0 * b @ a
                                              for n, (a, b) in ab.items()})  # fmt: skip


def test_the_loss_against_plain_code(model):
    from erasekit.methods.common import lora_copy

    pipe = model.pipeline
    unet = pipe.unet
    names = attn2_linears(unet, ("to_k", "to_v"))
    g = torch.Generator().manual_seed(0)
    adapted, layers = lora_copy(unet, names, 1, 8.0, g)
    with torch.no_grad():
        for layer in layers.values():
            b = layer.lora_B["default"].weight
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    c, ref = encode_prompts(pipe, ["a fish"]), encode_prompts(pipe, ["a forest"])
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(700)
    loss = unguide_loss(unet, adapted, x, t, c, ref, 2.0)
    ab = {n: (layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach())
          for n, layer in layers.items()}  # fmt: skip
    with torch.no_grad():
        e_ref, e_c = (unet(x, t, encoder_hidden_states=e).sample for e in (ref, c))
        with merged(model, ab).applied(model):
            e_n = unet(x, t, encoder_hidden_states=c).sample
    assert float(loss.detach()) == pytest.approx(float(F.mse_loss(e_n, e_ref - 2 * (e_c - e_ref))), rel=1e-4)


def plain_distance(model, ab, cond, null, gate) -> float:
    """d(p), written out: the base model's guided DDIM probe, then ‖ε_LoRA − ε_base‖ per probe, averaged."""
    from diffusers import DDIMScheduler

    pipe = model.pipeline
    g = torch.Generator("cpu").manual_seed(gate["seed"])
    r = gate["repeats"]
    noise = torch.randn((r, 4, 8, 8), generator=g)
    ts = torch.randint(gate["probe_t"], gate["probe_t"] + 20, (r,), generator=g)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    z = noise * sched.init_noise_sigma
    rows, nulls = cond.expand(r, -1, -1), null.expand(r, -1, -1)
    with torch.no_grad():
        for t in sched.timesteps[: gate["probe_stop"]]:
            e_u = pipe.unet(z, t, encoder_hidden_states=nulls).sample
            e_c = pipe.unet(z, t, encoder_hidden_states=rows).sample
            z = sched.step(e_u + gate["probe_guidance"] * (e_c - e_u), t, z).prev_sample
        base = pipe.unet(z, ts, encoder_hidden_states=rows).sample
        with merged(model, ab).applied(model):
            lora = pipe.unet(z, ts, encoder_hidden_states=rows).sample
    return float((lora - base).flatten(1).norm(dim=1).mean())


def test_the_gate_and_the_mix_against_plain_code(model):
    pipe = model.pipeline
    ab = pairs(model, torch.Generator().manual_seed(1))
    gate = {"repeats": 3, "probe_stop": 4, "probe_t": 800, "probe_guidance": 7.5, "seed": 5}
    art = artifact(model, ab, gate)
    prompts = ["a fish", "a dog"]
    cond, null = encode_prompts(pipe, prompts), encode_prompts(pipe, [""])
    d = [plain_distance(model, ab, cond[i : i + 1], null, gate) for i in range(2)]
    d_null = plain_distance(model, ab, null, null, gate)
    w = torch.tensor([-1.0 if x > d_null else 2.0 for x in d]).view(-1, 1, 1, 1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg_x, cfg_cond = torch.cat([x[:1], x[:1]]), torch.cat([null, cond[:1]])  # a guidance batch: [∅, fish]
    with torch.no_grad():
        base = pipe.unet(x, 600, encoder_hidden_states=cond).sample
        base_cfg = pipe.unet(cfg_x, 600, encoder_hidden_states=cfg_cond).sample
        with merged(model, ab).applied(model):
            lora = pipe.unet(x, 600, encoder_hidden_states=cond).sample
            lora_cfg = pipe.unet(cfg_x, 600, encoder_hidden_states=cfg_cond).sample
        with art.applied(model):
            mixed = pipe.unet(x, 600, encoder_hidden_states=cond).sample
            mixed_cfg = pipe.unet(cfg_x, 600, encoder_hidden_states=cfg_cond).sample
    assert torch.allclose(mixed, w * base + (1 - w) * lora, atol=1e-4)
    w0 = w[0]  # both halves of the guidance batch take the conditional row's w
    assert torch.allclose(mixed_cfg, w0 * base_cfg + (1 - w0) * lora_cfg, atol=1e-4)


def test_a_trained_artifact_round_trips(model, tmp_path):
    from erasekit.hooked import load_erasure

    art = erasekit.erase(model, ["fish"], "unguide", concept_type="object", iterations=2, ddim_steps=3, repeats=2,
                         probe_stop=2, lr=1e-2)  # fmt: skip
    (hook,) = art.hooks
    assert hook.kind == "guidance_mix" and set(hook.gates) == {m.name for m in art.modules}
    assert {m.attach.rsplit(".", 1)[1] for m in art.modules} == {"to_k", "to_v"}
    assert all(m.config["scale"] == 8.0 for m in art.modules)  # the release scales by alpha, not alpha / r
    loaded = load_erasure(art.save(tmp_path / "u"))
    assert loaded.fingerprint() == art.fingerprint()


def test_bad_configs_are_one_line_errors():
    from erasekit.errors import ErasekitError
    from erasekit.registry import make_config

    for bad, match in (
        ({"probe_stop": 50}, "probe_stop"),
        ({"repeats": 0}, "repeats"),
        ({"probe_t": 990}, "probe_t"),
    ):
        with pytest.raises(ErasekitError, match=match):
            make_config("unguide", **bad)
    assert UnGuideConfig().gate()["seed"] == 2024
