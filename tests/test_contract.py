"""The same contract for every registered method, on a tiny seeded SD1.x pipeline.

Each method is run with a tiny budget (``QUICK``); a method added to the registry without an entry here fails
``test_every_method_has_a_contract_entry``, so nothing escapes the matrix.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import erasekit
from erasekit.hooked import HookedPatch, load_erasure
from erasekit.patch import Patch
from erasekit.registry import config_from_dict, config_to_dict, list_methods

TE_BLOCK0 = r"text_encoder/encoder\.layers\.0\.(self_attn|mlp)\."
UNET_ATTN2 = r"unet/.*\.attn2\."
UNET_KV = r"unet/.*\.attn2\.to_[kv]\."
DIFFUSION = {"iterations": 2, "ddim_steps": 4}
# method: (tiny-budget overrides, regex every changed tensor must match)
QUICK: dict[str, tuple[dict, str]] = {
    "hirm-r": ({"steps": 2}, TE_BLOCK0),
    "hirm-s": ({"steps": 2}, TE_BLOCK0),
    "hirm-ablate-block0": ({"steps": 2}, TE_BLOCK0),
    "hirm-ablate-all": ({"steps": 2}, r"text_encoder/encoder\.layers\.\d+\.(self_attn|mlp)\."),
    "hirm-ablate-last": ({"steps": 2}, r"text_encoder/encoder\.layers\.2\.(self_attn|mlp)\."),
    "esd-x": (DIFFUSION, UNET_ATTN2),
    "esd-u": (DIFFUSION, r"unet/(?!.*\.attn2\.)"),
    "uce": ({}, UNET_KV),
    "rece": ({}, UNET_KV),
    "speed": ({}, r"unet/.*\.attn2\.to_v\."),
    "mace-cfr": ({}, UNET_KV),
    "advunlearn": ({**DIFFUSION, "attack_steps": 2, "retain_batch": 1}, r"text_encoder/"),
    "fewshot-te": ({"epochs": 1, "n_images": 2}, r"text_encoder/encoder\.layers\.\d+\.(mlp|self_attn)\."),
    "race": ({**DIFFUSION, "esd_iterations": 1, "pgd_steps": 2}, r"unet/(?!.*\.attn2\.)"),
    "ant": ({**DIFFUSION, "switch_step": 2, "mask_iterations": 1, "mask_seeds": (1,)}, r"unet/"),
    "trce": (
        {"epochs": 1, "trajectories": 2, "reg_trajectories": 2, "ddim_steps": 4, "early_steps": 1},
        r"unet/.*\.(attn1\.|attn2\.to_[qkv]\.)",
    ),
    "leace": ({}, r"unet/.*\.attn2\.(to_[kv]\.weight|to_out\.0\.bias)$"),
    "rlace": ({"max_iterations": 3}, r"unet/.*\.attn2\.to_[kv]\.weight$"),
    "all-but-one": (DIFFUSION, UNET_ATTN2),
    "crce": (DIFFUSION, UNET_ATTN2),
    "doco": (
        {"iterations": 3, "warmup": 1, "batch_size": 2, "anchor_images": 3, "anchor_steps": 2},
        r"unet/.*\.attn2\.to_[kv]\.weight$",
    ),
    "ace": (
        {"iterations": 2, "ddim_steps": 3, "relevance": "uniform"},
        r"unet/.*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2|ff)\.).*weight$",
    ),
    # FT off: the merged plain Patch (FT on, the hooked artifact, has its contract in tests/test_spm.py)
    "spm": (
        {"iterations": 2, "ddim_steps": 3, "warmup": 0, "facilitated_transport": False},
        r"unet/.*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn1|attn2|ff)\.).*weight$",
    ),
    # hooked artifacts: the pattern is what their added modules attach to
    "receler": ({**DIFFUSION, "adv_iterations": 2}, r"unet/.*\.attn2$"),
    "irece": ({"until_t": 0}, r"$^"),  # a hook only: no added module
    "unguide": ({**DIFFUSION, "repeats": 2, "probe_stop": 2, "lr": 1e-2}, r"unet/.*\.attn2\.to_[kv]$"),
    "itd": (
        {
            "captions": ("a fish in ink style", "a dog in oil style", "a cat"),
            "retain": ("dog",),
            "epochs": 2,
            "batch_prompts": 2,
            "warmup": 1,
            "lr": 1e-3,
            "threshold_stat": "mean",
            "threshold_scale": -8.0,
        },
        r"text_encoder/encoder\.layers\.2$",
    ),
    "realera": (
        {**DIFFUSION, "neighbours": 2, "beyond": 2, "templates": ("a photo of {}", "{} in a snapshot")},
        UNET_KV,
    ),
    "co-erasing": (
        {
            **DIFFUSION,
            "text_iterations": 1,
            "images": 2,
            "adapter_images": 2,
            "adapter_steps": 1,
            "adapter_batch": 2,
            "image_steps": 2,
        },  # fmt: skip
        r"unet/(?!.*\.attn2\.)(?!time_embedding\.)",
    ),
}
METHODS = list_methods()


def test_every_method_has_a_contract_entry():
    assert sorted(QUICK) == METHODS


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def state(model) -> dict[str, torch.Tensor]:
    return {
        f"{comp}/{name}": t.detach().clone()
        for comp in ("text_encoder", "unet")
        for name, t in model.components[comp].state_dict().items()
    }


def run(model, method: str) -> Patch:
    overrides, _ = QUICK[method]
    return erasekit.erase(model, ["fish"], method=method, concept_type="object", **overrides)


@pytest.fixture(scope="module")
def results(model):
    """Per method: (state before, patch, state after erase, second patch) — computed lazily, once."""
    cache: dict[str, tuple] = {}

    def get(method: str) -> tuple:
        if method not in cache:
            before = state(model)
            first = run(model, method)
            after = state(model)
            cache[method] = (before, first, after, run(model, method))
        return cache[method]

    return get


def unet_out(model) -> torch.Tensor:
    from erasekit.denoising import encode_prompts

    pipe = model.pipeline
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipe.unet(
            x, 500, encoder_hidden_states=encode_prompts(pipe, ["A fish image.", "a dog"])
        ).sample


def hooked_contract(method, model, before, art, again, tmp_path) -> None:
    """What a hooked artifact owes: intended attach points, determinism, JSON config, exact save/load/apply/remove."""
    pattern = re.compile(QUICK[method][1])
    assert art.modules or art.hooks
    for m in art.modules:
        assert pattern.match(m.attach), f"{method} attached to an unintended module {m.attach}"
    assert again.fingerprint() == art.fingerprint()
    cfg = config_from_dict(method, json.loads(json.dumps(art.config)))
    assert config_to_dict(cfg) == art.config and art.erase_seconds is not None
    loaded = load_erasure(art.save(tmp_path / "h"))
    assert isinstance(loaded, HookedPatch) and loaded.fingerprint() == art.fingerprint()
    out_before = unet_out(model)
    with loaded.applied(model):
        during = unet_out(model)
    assert not torch.allclose(during, out_before), "the artifact changes nothing"
    assert torch.equal(unet_out(model), out_before)
    restored = state(model)
    assert all(torch.equal(before[k], restored[k]) for k in before)


@pytest.mark.parametrize("method", METHODS)
def test_contract(method, model, results, tmp_path):
    before, patch, after, again = results(method)
    if isinstance(patch, HookedPatch):
        assert all(torch.equal(before[k], after[k]) for k in before), "erase() modified the model"
        return hooked_contract(method, model, before, patch, again, tmp_path)
    # erasing leaves the loaded model as it was
    assert all(torch.equal(before[k], after[k]) for k in before), "erase() modified the model"
    # only the intended tensors change, and the patch holds only tensors that changed
    pattern = re.compile(QUICK[method][1])
    assert patch.tensors, "the patch is empty"
    for key, value in patch.tensors.items():
        assert pattern.match(key), f"{method} changed an unintended tensor {key}"
        assert key in before and value.shape == before[key].shape
    assert any(not torch.equal(v, before[k]) for k, v in patch.tensors.items()), "the patch changes nothing"
    # a fixed seed gives the same patch
    assert set(again.tensors) == set(patch.tensors)
    assert all(torch.equal(again.tensors[k], patch.tensors[k]) for k in patch.tensors)
    # the config round-trips through JSON and is recorded in the patch
    cfg = config_from_dict(method, json.loads(json.dumps(patch.config)))
    assert config_to_dict(cfg) == patch.config and patch.erase_seconds is not None
    # save/load gives equal tensors
    loaded = Patch.load(patch.save(tmp_path / "p"))
    assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)
    # apply then remove restores everything exactly
    handle = loaded.apply_(model)
    applied = state(model)
    assert all(torch.equal(applied[k], patch.tensors[k].to(applied[k].dtype)) for k in patch.tensors)
    handle.remove()
    restored = state(model)
    assert all(torch.equal(before[k], restored[k]) for k in before)
