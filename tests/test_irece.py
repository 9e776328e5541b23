"""IRECE: the localisation mask and the perturbed call against plain code; guidance batches; the window."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit.hooks.attention_maps import attention_probs
from erasekit.hooks.concept_perturb import step_noise
from tests.fixtures.evaluation_tiny import encode, one_thread  # noqa: F401


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def plain_mask(model, x, t, prompt, threshold) -> torch.Tensor:
    """The mask written out: maps of the prompt's tokens, the 4x4 layers, normalised, thresholded, upsampled."""
    pipe = model.pipeline
    unet = pipe.unet
    n = len(pipe.tokenizer(prompt).input_ids) - 2
    maps = []

    def record(mod, args, kwargs):
        maps.append(attention_probs(mod, args[0], kwargs["encoder_hidden_states"]))

    attns = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    handles = [a.register_forward_pre_hook(record, with_kwargs=True) for a in attns]
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=encode(pipe, [prompt]).expand(x.shape[0], -1, -1))
    for h in handles:
        h.remove()
    sides = sorted({int(m.shape[2] ** 0.5) for m in maps})
    side = sides[1] if len(sides) > 1 else sides[0]  # the coarsest above the smallest, or the only one
    keep = [m[..., 1 : n + 1].mean(-1).mean(1) for m in maps if int(m.shape[2] ** 0.5) == side]
    avg = torch.stack(keep).mean(0)  # [N, HW]
    out = []
    for row in avg:
        norm = (row - row.min()) / (row.max() - row.min())
        out.append((norm >= threshold).float().view(1, side, side))
    return F.interpolate(torch.stack(out), size=x.shape[-2:], mode="nearest")


def test_the_perturbed_call_against_plain_code(model):
    pipe = model.pipeline
    art = erasekit.erase(
        model, ["fish"], "irece", concept_type="object", until_t=300, strength=2.0, threshold=0.3
    )
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode(pipe, ["a fish", "a dog"])
    mask = plain_mask(model, x, 500, "fish", 0.3)
    assert 0 < float(mask.mean()) < 1
    noise = step_noise((4, 8, 8), 500, 0)  # the same for every image
    x_tilde = x + 2.0 * x.flatten(1).std(dim=1).view(-1, 1, 1, 1) * mask * noise
    with torch.no_grad():
        want = pipe.unet(x_tilde, 500, encoder_hidden_states=cond).sample
        late = pipe.unet(x, 200, encoder_hidden_states=cond).sample
        with art.applied(model):
            got = pipe.unet(x, 500, encoder_hidden_states=cond).sample
            got_late = pipe.unet(x, 200, encoder_hidden_states=cond).sample  # after the window: untouched
            # a guidance batch [∅, c] of one image: both halves get that image's perturbation
            null = encode(pipe, [""])
            cfg = pipe.unet(
                torch.cat([x[:1], x[:1]]), 500, encoder_hidden_states=torch.cat([null, cond[:1]])
            ).sample
        cfg_want = pipe.unet(
            torch.cat([x_tilde[:1]] * 2), 500, encoder_hidden_states=torch.cat([null, cond[:1]])
        ).sample
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got_late, late)
    assert torch.allclose(cfg, cfg_want, atol=1e-5)


def test_an_images_perturbation_does_not_depend_on_its_batch(model):
    pipe = model.pipeline
    art = erasekit.erase(model, ["fish"], "irece", concept_type="object", until_t=0, threshold=0.3)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = encode(pipe, ["a fish", "a dog", "a cup"])
    with torch.no_grad(), art.applied(model):
        batch = pipe.unet(x, 700, encoder_hidden_states=cond).sample
        one = pipe.unet(x[1:2], 700, encoder_hidden_states=cond[1:2]).sample
        per_row_t = pipe.unet(x, torch.tensor([700, 700, 700]), encoder_hidden_states=cond).sample
    assert torch.allclose(batch[1:2], one, atol=1e-4) and torch.allclose(per_row_t, batch, atol=1e-5)
    assert torch.equal(step_noise((4, 8, 8), 700, 3), step_noise((4, 8, 8), 700, 3))
    assert not torch.equal(step_noise((4, 8, 8), 700, 3), step_noise((4, 8, 8), 680, 3))


def test_bad_configs_are_one_line_errors():
    from erasekit.errors import ErasekitError
    from erasekit.registry import make_config

    for bad in ({"threshold": 1.0}, {"strength": -1.0}, {"until_t": -5}):
        with pytest.raises(ErasekitError):
            make_config("irece", **bad)


def test_stacked_on_a_text_encoder_edit_it_localises_with_the_base_encoder(model):
    from erasekit.hooked import compose
    from erasekit.patch import Patch

    pipe = model.pipeline
    te = model.components["text_encoder"]
    name = "encoder.layers.0.mlp.fc1.weight"
    edit = Patch.from_tensors(model, "text_encoder", {name: torch.zeros_like(te.get_parameter(name))})
    art = erasekit.erase(model, ["fish"], "irece", concept_type="object", until_t=0, threshold=0.3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = encode(pipe, ["a fish", "a dog"])  # the UNet sees the same conditioning in both runs
    with torch.no_grad():
        with art.applied(model):
            alone = pipe.unet(x, 600, encoder_hidden_states=cond).sample
        with compose([edit, art]).applied(model):
            stacked = pipe.unet(x, 600, encoder_hidden_states=cond).sample
        base_fish = encode(pipe, ["fish"])
        with edit.applied(model):
            assert not torch.allclose(
                encode(pipe, ["fish"]), base_fish
            )  # the edit changes the concept's embedding
    assert torch.equal(alone, stacked)
