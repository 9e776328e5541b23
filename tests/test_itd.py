"""ItD: the SAE's deactivation and gate, the feature selection and the threshold against plain code; training."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.hooks.sae import SAEConfig, TopKSAE
from erasekit.methods.itd import (
    ItDConfig,
    erased_features,
    geometric_median,
    layer_outputs,
    new_sae,
    own_rows,
    resolve,
    shift_stat,
    train_sae,
)
from tests.fixtures.evaluation_tiny import one_thread  # noqa: F401

CAPTIONS = tuple(
    f"a {o} in {s} style" for o in ("fish", "dog", "cat", "tree") for s in ("ink", "oil", "neon")
)
TINY = {
    "captions": CAPTIONS,
    "retain": ("dog", "cat"),
    "epochs": 2,
    "batch_prompts": 4,
    "warmup": 2,
    "lr": 1e-3,
}


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def random_sae(features=(1, 5), scale=-8.0, threshold=0.0) -> TopKSAE:
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(SAEConfig(dim=6, latents=16, k=3, features=features, scale=scale, threshold=threshold))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def test_deactivation_and_gate_match_plain_code():
    sae = random_sae()
    h = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    w_enc, w_dec = sae.encoder.weight, sae.decoder.weight
    r = torch.empty_like(h)
    for b in range(2):
        for i in range(5):
            pre = w_enc @ (h[b, i] - sae.pre_bias) + sae.latent_bias
            z = torch.zeros(16)
            for j in pre.argsort(descending=True)[:3]:
                z[j] = max(float(pre[j]), 0.0)
            if i > 0:  # BOS keeps its latents
                z[[1, 5]] *= -8
            r[b, i] = w_dec @ z + sae.pre_bias
    with torch.no_grad():
        assert torch.allclose(sae.deactivated(h), r, atol=1e-5)
        shift = ((r - h) ** 2).mean(dim=(1, 2))
        assert torch.allclose(sae.shift(h), shift, atol=1e-5)
        gated = random_sae(threshold=float(shift.mean()))  # between the two prompts' shifts
        out = h + gated(h)
    on = shift >= shift.mean()
    assert on.any() and not on.all()
    for b in range(2):
        assert torch.allclose(out[b], r[b] if on[b] else h[b], atol=1e-5)


def test_feature_selection_is_the_set_difference_of_top_n():
    sae = random_sae(features=())
    g = torch.Generator().manual_seed(2)
    erase, retain = [torch.randn(4, 6, generator=g) for _ in range(2)], [torch.randn(3, 6, generator=g)]

    def top(h, n):
        acts = sae.encode(h)[1:].max(0).values
        return set(acts.topk(n).indices.tolist())

    with torch.no_grad():
        want = sorted((top(erase[0], 4) | top(erase[1], 4)) - top(retain[0], 4))
        assert erased_features(sae, erase, retain, 4) == want
        per_row = (sae.deactivated(torch.stack(erase)) - torch.stack(erase)).pow(2).mean(-1)
    assert torch.allclose(shift_stat(sae, torch.stack(erase), "max"), per_row.max(1).values)
    assert torch.allclose(shift_stat(sae, torch.stack(erase), "mean"), per_row.mean(1))


def test_training_keeps_unit_decoder_columns_and_lowers_the_loss(model):
    sizes = resolve(ItDConfig(concept_type="object"), model.components["text_encoder"])
    assert (sizes.layer, sizes.dim, sizes.k, sizes.latents, sizes.n, sizes.stat) == (2, 32, 3, 1024, 6, "max")
    g = torch.Generator().manual_seed(0)
    acts = own_rows(*layer_outputs(model.pipeline, 2, CAPTIONS))
    sae = new_sae(sizes, g)
    losses = train_sae(sae, acts, ItDConfig(epochs=20, batch_prompts=4, warmup=5, lr=1e-3), g)
    assert sum(losses[-3:]) < sum(losses[:3])
    norms = sae.decoder.weight.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=0.05)  # renormalised before each step
    x = torch.randn(50, 3, generator=g)
    m = geometric_median(x)
    assert float((x - m).norm(dim=1).sum()) <= float((x - x.mean(0)).norm(dim=1).sum()) + 1e-5


def test_the_threshold_lets_every_erase_prompt_through(model):
    art = erasekit.erase(model, ["fish"], "itd", "consistent", concept_type="object", **TINY)
    (mod,) = art.modules
    assert mod.attach == "text_encoder/encoder.layers.2" and mod.type == "topk_sae" and mod.config["features"]
    sae = mod.build()
    pipe = model.pipeline
    erase, _ = layer_outputs(pipe, 2, ["fish", "A fish image.", "a picture of a fish"])
    with torch.no_grad():
        shifts = sae.shift(erase)
    assert float(shifts.min()) == pytest.approx(mod.config["threshold"] / 0.99, rel=1e-4)
    with torch.no_grad():
        assert torch.allclose(erase + sae(erase), sae.deactivated(erase), atol=1e-5)  # all three gated


def test_outside_minicanvas_it_needs_a_corpus(model):
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError, match="captions"):
        erasekit.erase(model, ["helicopter"], "itd", concept_type="object", epochs=1)


def test_the_sae_memo_gives_what_a_retraining_gives_and_follows_the_encoder(model):
    from erasekit.methods import itd

    itd._SAES.clear()
    first = erasekit.erase(model, ["fish"], "itd", concept_type="object", **TINY)
    assert len(itd._SAES) == 1
    (key,) = itd._SAES
    second = erasekit.erase(model, ["fish"], "itd", "consistent", concept_type="object", **TINY)
    assert list(itd._SAES) == [key]  # a hit: nothing trained
    itd._SAES.clear()
    fresh = erasekit.erase(model, ["fish"], "itd", "consistent", concept_type="object", **TINY)
    for a, b in zip(second.modules[0].tensors.values(), fresh.modules[0].tensors.values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert second.modules[0].config == fresh.modules[0].config
    assert first.modules[0].config["threshold"] != fresh.modules[0].config["threshold"]  # the presets differ

    encoder = model.pipeline.text_encoder
    sizes = resolve(ItDConfig(**TINY), encoder)
    before = itd.sae_key(encoder, sizes, CAPTIONS, ItDConfig(**TINY))
    assert before == key
    assert itd.sae_key(encoder, sizes, CAPTIONS[:-1], ItDConfig(**TINY)) != before
    assert itd.sae_key(encoder, sizes, CAPTIONS, ItDConfig(**{**TINY, "seed": 1})) != before
    w = encoder.encoder.layers[0].mlp.fc1.weight
    with torch.no_grad():
        w.add_(1.0)
        try:
            assert itd.sae_key(encoder, sizes, CAPTIONS, ItDConfig(**TINY)) != before
        finally:
            w.sub_(1.0)
