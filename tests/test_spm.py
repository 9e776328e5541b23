"""SPM: the hooked (FT on) contract, FT off as the same adapters merged, the loss and the anchors against plain code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.hooked import HookedPatch, load_erasure
from erasekit.methods.spm import (
    SPMConfig,
    anchor_rows,
    lora_copy,
    sample_anchors,
    spm_loss,
    transformer_layers,
)
from erasekit.patch import Patch
from erasekit.registry import config_from_dict, config_to_dict
from tests.fixtures.evaluation_tiny import one_thread  # noqa: F401

TINY = {"iterations": 3, "ddim_steps": 3, "warmup": 0, "lr": 1e-2}


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


@pytest.fixture(scope="module")
def hooked(model):
    return erasekit.erase(model, ["fish"], "spm", concept_type="object", **TINY)


def unet_out(model, prompts=("a fish", "a dog")) -> torch.Tensor:
    from erasekit.denoising import encode_prompts

    pipe = model.pipeline
    x = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=encode_prompts(pipe, list(prompts))).sample


def test_transformer_layers_are_every_linear_and_conv_of_the_transformer_blocks(model):
    unet = model.components["unet"]
    names = transformer_layers(unet)
    wanted = [n for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and ".attentions." in f".{n}"]  # fmt: skip
    assert (
        names == wanted
        and any(n.endswith("attn2.to_k") for n in names)
        and any("proj_in" in n for n in names)
    )


def test_hooked_contract(model, hooked, tmp_path):
    before, out_before = (
        {k: v.clone() for k, v in model.components["unet"].state_dict().items()},
        unet_out(model),
    )
    again = erasekit.erase(model, ["fish"], "spm", concept_type="object", **TINY)
    after = model.components["unet"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "erase() modified the model"
    assert isinstance(hooked, HookedPatch) and hooked.patch is None
    assert [m.attach for m in hooked.modules] == [
        f"unet/{n}" for n in transformer_layers(model.components["unet"])
    ]
    (hook,) = hooked.hooks
    assert (hook.kind, hook.config["prompts"], set(hook.gates)) == (
        "prompt_gate",
        ["fish"],
        {m.name for m in hooked.modules},
    )
    assert again.fingerprint() == hooked.fingerprint()  # a fixed seed gives the same artifact
    cfg = config_from_dict("spm", json.loads(json.dumps(hooked.config)))
    assert config_to_dict(cfg) == hooked.config and hooked.erase_seconds is not None
    loaded = load_erasure(hooked.save(tmp_path / "h"))
    assert loaded.fingerprint() == hooked.fingerprint()
    handle = loaded.apply_(model)
    during = unet_out(model)
    handle.remove()
    assert not torch.allclose(during, out_before) and torch.equal(unet_out(model), out_before)


def test_ft_off_merges_the_same_adapters(model, hooked):
    merged = erasekit.erase(
        model, ["fish"], "spm", concept_type="object", facilitated_transport=False, **TINY
    )
    assert isinstance(merged, Patch)
    unet = model.components["unet"]
    assert set(merged.tensors) == {f"{m.attach}.weight" for m in hooked.modules}
    for m in hooked.modules:
        name = m.attach.split("/", 1)[1]
        up, down = m.tensors["up.weight"].flatten(1), m.tensors["down.weight"]
        want = unet.get_submodule(name).weight + torch.einsum("or,r...->o...", up, down)  # W + B A (alpha 1)
        assert torch.allclose(merged.tensors[f"{m.attach}.weight"], want, atol=1e-6), name
    # FT at s = 1 (a prompt holding every token of the concept) is the merged model
    with merged.applied(model):
        plain = unet_out(model, ("a fish",))
    with hooked.applied(model):
        gated = unet_out(model, ("a fish",))
    assert torch.allclose(plain, gated, atol=1e-5)


def test_the_loss_is_the_erase_term_plus_lambda_times_anchoring(model):
    from erasekit.denoising import encode_prompts

    pipe, config = model.pipeline, SPMConfig(negative_guidance=1.5, anchor_weight=10.0, anchors=2)
    unet = pipe.unet
    names = transformer_layers(unet)
    g = torch.Generator().manual_seed(0)
    adapted, layers = lora_copy(unet, names, config.rank, config.alpha, g)
    with torch.no_grad():
        for layer in layers.values():  # a trained-looking B, so the adapted model differs from the base
            b = layer.lora_B["default"].weight
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    c, null = encode_prompts(pipe, ["a fish"]), encode_prompts(pipe, [""])
    rows = sample_anchors(c[0], 2, g)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(700)
    loss = spm_loss(unet, adapted, x, t, c, null, rows, config)
    # plain code: the adapted model is the base with W + B A merged in
    plain = {}
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        plain[f"{name}.weight"] = unet.get_submodule(name).weight + torch.einsum(
            "or,r...->o...", b.flatten(1), a
        )
    with torch.no_grad():
        e = {
            k: unet(x, t, encoder_hidden_states=v).sample
            for k, v in {"c": c, "n": null, "a0": rows[:1], "a1": rows[1:]}.items()
        }
        with Patch.from_tensors(model, "unet", plain).applied(model):
            th = {
                k: unet(x, t, encoder_hidden_states=v).sample
                for k, v in {"c": c, "a0": rows[:1], "a1": rows[1:]}.items()
            }
    erase_term = F.mse_loss(th["c"], e["n"] - 1.5 * (e["c"] - e["n"]))
    anchoring = (F.mse_loss(th["a0"], e["a0"]) + F.mse_loss(th["a1"], e["a1"])) / 2
    assert float(loss.detach()) == pytest.approx(float(erase_term + 10.0 * anchoring), rel=1e-4)


def test_anchors_and_the_released_rows():
    c = torch.randn(77, 16, generator=torch.Generator().manual_seed(1))
    a = sample_anchors(c, 4, torch.Generator().manual_seed(0))
    assert a.shape == (4, 77, 16) and torch.equal(a, sample_anchors(c, 4, torch.Generator().manual_seed(0)))
    ratio = a.flatten(1).norm(dim=1) / c.norm()
    assert bool(((ratio >= 0.8) & (ratio < 1.2)).all())
    cos = F.cosine_similarity(a.flatten(1), c.flatten().unsqueeze(0), dim=1)
    assert bool((cos.abs() < 0.1).all())  # random directions in 77 x 16 dimensions
    null = torch.zeros(1, 77, 16)
    assert torch.equal(anchor_rows(a, null, "sampled"), a)
    released = anchor_rows(a, null, "release")  # [∅, a1, ∅, a2, ∅, a3, ∅, a4], second half
    assert torch.equal(released, torch.stack([null[0], a[2], null[0], a[3]]))


def test_bad_configs_are_one_line_errors():
    from erasekit.errors import ErasekitError
    from erasekit.registry import make_config

    for bad, match in (({"anchor_rows": "odd"}, "anchor_rows"), ({"ddim_steps": 1}, "ddim_steps"),
                       ({"ft_exponent": 3}, "ft_exponent"), ({"anchors": 3, "anchor_rows": "release"}, "even")):  # fmt: skip
        with pytest.raises(ErasekitError, match=match):
            make_config("spm", **bad)
    assert (
        make_config("spm", "release").anchor_rows == "release"
        and not make_config("spm", "merged").facilitated_transport
    )
