"""The baseline methods (ESD, UCE, RECE, SPEED, AdvUnlearn, few-shot TE, MACE-CFR, HiRM ablations) on tiny models.

Every method runs the registry contract (intended tensors only, config round-trip, save/load, determinism, the
model left unchanged); closed-form methods are also checked against their defining equations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import erasekit
from erasekit import progress
from erasekit.methods import _closed_form as cf
from erasekit.patch import Patch
from erasekit.registry import config_from_dict, config_to_dict, make_config

progress.set_enabled(False)

FAST = {  # tiny budgets: the contract, not the quality
    "esd-x": {"iterations": 1, "ddim_steps": 2},
    "esd-u": {"iterations": 1, "ddim_steps": 2},
    "uce": {"preserve": ("a dog", "a house")},
    "rece": {"preserve": ("a dog",)},
    "speed": {"retain": ("a dog", "a house", "a tree")},
    "mace-cfr": {},
    "advunlearn": {"iterations": 1, "ddim_steps": 2, "attack_steps": 1, "retain_batch": 1},
    "fewshot-te": {"epochs": 1, "n_images": 2},
    "hirm-ablate-block0": {"steps": 2},
    "hirm-ablate-all": {"steps": 2},
    "hirm-ablate-last": {"steps": 2},
}
CASES = [(m, None) for m in FAST] + [
    ("esd-x", "strict"),
    ("uce", "legacy"),
    ("advunlearn", "block0"),
    ("advunlearn", "all-blocks"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """``loaded(family)``: a tiny pipeline of another family, loaded once per module (methods never modify it)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = erasekit.load(tiny_model_dir(family))
        return cache[family]

    return get


def gradient_image_source(concept: str, n: int, seed: int) -> list[np.ndarray]:
    """Stand-in "real images" for fewshot-te: seeded uint8 noise, 16x16."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


def run(model, method: str, preset: str | None = None, concept: str = "circle"):
    config = make_config(method, preset, "object", **FAST[method])
    if method == "fewshot-te":  # pass images through the callable hook, as library users do
        from erasekit.methods.fewshot_te import erase_fewshot_te

        return erase_fewshot_te(model, [concept], config, images=gradient_image_source), config
    return erasekit.erase(model, [concept], method, config=config), config


def unet_params(model, keep) -> set[str]:
    """``unet/<param>`` for every parameter whose owning module satisfies ``keep(path_parts, module)``."""
    unet = model.components["unet"]
    return {
        f"unet/{mod}.{p}"
        for mod, m in unet.named_modules()
        for p, _ in m.named_parameters(recurse=False)
        if keep(mod.split("."), m)
    }


def te_params(model, keep) -> set[str]:
    return {
        f"text_encoder/{n}"
        for n, _ in model.components["text_encoder"].named_parameters()
        if keep(n.split("."))
    }


def intended(model, method: str, preset: str | None) -> set[str]:
    """The tensors each method may change, written independently of the methods' own selection code."""
    lin, conv = torch.nn.Linear, (torch.nn.Linear, torch.nn.Conv2d)
    if method == "esd-x" and preset == "strict" or method in ("uce", "rece", "mace-cfr"):
        return unet_params(model, lambda parts, m: "attn2" in parts and parts[-1] in ("to_k", "to_v"))
    if method == "speed":
        return unet_params(model, lambda parts, m: "attn2" in parts and parts[-1] == "to_v")
    if method == "esd-x":
        return unet_params(model, lambda parts, m: "attn2" in parts and isinstance(m, lin))
    if method == "esd-u":
        return unet_params(model, lambda parts, m: "attn2" not in parts and isinstance(m, conv))
    last = str(len(model.components["text_encoder"].encoder.layers) - 1)
    layer = lambda parts: parts[2] if parts[:2] == ["encoder", "layers"] else None  # noqa: E731
    proj = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    if method == "advunlearn":
        keep = {"paper": lambda p: True, "block0": lambda p: layer(p) == "0", "all-blocks": layer}[
            preset or "paper"
        ]
        return te_params(model, keep)
    if method == "fewshot-te":
        return te_params(model, lambda p: layer(p) and ("mlp" in p or layer(p) == last and "self_attn" in p))
    if method == "hirm-ablate-all":  # the last block's MLP sits after the supervision point: it cannot move
        return te_params(
            model, lambda p: layer(p) is not None and p[-2] in proj and not (layer(p) == last and "mlp" in p)
        )
    block = {"hirm-ablate-block0": "0", "hirm-ablate-last": last}[method]
    return te_params(model, lambda p: layer(p) == block and p[-2] in proj)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {
        f"{c}/{k}": v.clone()
        for c, mod in model.components.items()
        if isinstance(mod, torch.nn.Module)
        for k, v in mod.state_dict().items()
    }


@pytest.mark.parametrize(("method", "preset"), CASES)
def test_contract(model, tmp_path, method, preset):
    before = snapshot(model)
    patch, config = run(model, method, preset)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the loaded model was left modified"

    expected = intended(model, method, preset)
    assert patch.tensors and set(patch.tensors) <= expected, sorted(set(patch.tensors) - expected)[:3]
    if method in ("uce", "rece", "mace-cfr", "speed", "esd-x", "hirm-ablate-all", "hirm-ablate-block0"):
        assert set(patch.tensors) == expected  # every selected tensor really moves
    for key, value in patch.tensors.items():
        assert not torch.equal(value, before[key]), f"{key} is in the patch but unchanged"

    data = json.loads(json.dumps(config_to_dict(config)))
    assert config_from_dict(method, data) == config

    loaded = Patch.load(patch.save(tmp_path / "p"))
    assert loaded.tensors.keys() == patch.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], patch.tensors[k]) for k in patch.tensors)
    loaded.check(model)

    again, _ = run(model, method, preset)
    assert again.fingerprint() == patch.fingerprint(), "same seed, different patch"


@pytest.mark.parametrize(("family", "width"), [("sd2", 32), ("sdxl", 32 + 48)])
def test_uce_on_other_families_reads_their_own_conditioning(loaded, family, width):
    model = loaded(family)  # SDXL: both encoders' states concatenated
    patch = erasekit.erase(model, ["Van Gogh"], "uce", concept_type="style")
    assert model.components["unet"].config.cross_attention_dim == width
    w0 = kv_weights(model)
    c_e = cf.last_token_embeddings(model.pipeline, ["Van Gogh"])
    c_g = cf.last_token_embeddings(model.pipeline, ["art"])
    assert c_e.shape == (1, width)
    for name, w in edited(patch, w0).items():
        assert rel(c_e @ w.T, c_g @ w0[name].T) < 0.05


def test_speed_runs_on_sdxl(loaded):
    model = loaded("sdxl")
    patch = erasekit.erase(model, ["Van Gogh"], "speed", concept_type="style", retain=("a dog",))
    assert patch.tensors and all(k.endswith("attn2.to_v.weight") for k in patch.tensors)
    assert all(t.shape[1] == 80 for t in patch.tensors.values())


def kv_weights(model, projections=("to_k", "to_v")) -> dict[str, torch.Tensor]:
    return cf.weights64(cf.kv_layers(model.components["unet"], projections))


def edited(patch: Patch, names) -> dict[str, torch.Tensor]:
    return {n: patch.tensors[f"unet/{n}.weight"].double() for n in names}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_uce_maps_erased_to_guide_and_keeps_preserved(model):
    pipe, preserve = model.pipeline, ("a dog", "a house")
    patch = erasekit.erase(model, ["Van Gogh"], "uce", concept_type="style", preserve=preserve)
    c_e = cf.last_token_embeddings(pipe, ["Van Gogh"])
    c_g = cf.last_token_embeddings(pipe, ["art"])
    c_p = cf.last_token_embeddings(pipe, list(preserve))
    w0 = kv_weights(model)
    for name, w in edited(patch, w0).items():
        assert rel(c_e @ w0[name].T, c_g @ w0[name].T) > 0.3  # the edit has work to do
        assert rel(c_e @ w.T, c_g @ w0[name].T) < 0.05
        assert rel(c_p @ w.T, c_p @ w0[name].T) < 0.05


@pytest.mark.parametrize("filters", [False, True])
def test_speed_keeps_invariants_and_retain_and_moves_target_to_anchor(model, filters):
    from erasekit.methods.common import generator
    from erasekit.methods.speed import null_constraints

    pipe, retain = model.pipeline, ("a dog", "a house", "a tree")
    config = make_config("speed", None, "style", retain=retain, ipf=filters, dpa=filters)
    assert config.anchor == "art"
    patch = erasekit.erase(model, ["Van Gogh"], "speed", config=config)
    k2 = null_constraints(pipe, config.kmeans, generator(config.seed)).T  # the first draws of the seed
    target = cf.last_token_embeddings(pipe, ["Van Gogh"])
    anchor = cf.last_token_embeddings(pipe, ["art"])
    rows = cf.last_token_embeddings(pipe, list(retain))
    w0 = kv_weights(model, ("to_v",))
    for name, w in edited(patch, w0).items():
        assert rel(k2 @ w.T, k2 @ w0[name].T) < 1e-6  # IEC: exact equality constraints
        moved = (target @ (w - w0[name]).T).norm()
        if not filters:  # every retain row spans P's complement: its outputs stay put
            assert (rows @ (w - w0[name]).T).norm() < 1e-6 * moved
        assert (target @ w.T - anchor @ w0[name].T).norm() < 0.9 * (target - anchor).matmul(w0[name].T).norm()


def test_speed_prior_filtering_keeps_the_influential_rows():
    from erasekit.methods.speed import augment, influence_filter

    e = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    rows = torch.eye(3, dtype=torch.float64)
    assert torch.equal(influence_filter(e, rows), rows[:1])  # scores 3, 1, 0: mean 4/3
    w = torch.diag(torch.tensor([2.0, 1.0, 1e-3], dtype=torch.float64))
    e = torch.ones(1, 3, dtype=torch.float64)  # influence = |sum of the row|: the noise decides
    out = augment(w, e, rows, 4, torch.Generator().manual_seed(0))
    assert 0 < out.shape[0] < 12  # only the noisy copies above their mean influence
    assert all(
        any(torch.equal(o[:2], r[:2]) for r in rows) for o in out
    )  # noise on W's weakest direction only
    assert all(float(o[2]) not in (0.0, 1.0) for o in out)  # and that direction really moved


def test_speed_falls_back_to_the_null_text_rows(model):
    from erasekit.methods.speed import retain_rows, retain_texts, speed_delta, target_statistics

    config = make_config("speed", None, "style", ipf=False, dpa=False, iec=False)
    assert retain_texts(["Van Gogh"], config) == []  # not a MiniCanvas concept, none given
    rows = retain_rows(model.pipeline, [], torch.Generator().manual_seed(0))
    null = cf.sequence_embeddings(model.pipeline, [""])[0, 1:]
    assert rows.shape == null.shape and torch.allclose(rows.sum(0), null.sum(0))  # shuffled rows 1..L-1
    tt, at = target_statistics(model.pipeline, ["Van Gogh"], config)
    w = next(iter(kv_weights(model, ("to_v",)).values()))
    vals, vecs = torch.linalg.eigh(null.T @ null / null.shape[0])
    p = vecs[:, vals < 0.1] @ vecs[:, vals < 0.1].T
    want = w @ (at - tt) @ p @ torch.linalg.inv(tt @ p + torch.eye(w.shape[1], dtype=torch.float64))
    assert torch.allclose(speed_delta(w, (tt, at), rows, None, config, torch.Generator()), want, atol=1e-10)


def test_rece_derives_c_prime_by_its_formula(model):
    from erasekit.methods.rece import derive_embedding
    from erasekit.methods.uce import uce_weights

    pipe = model.pipeline
    w0 = kv_weights(model)
    c = cf.sequence_embeddings(pipe, ["nudity"])[0]  # [L, D]: every row of the prompt
    null = cf.last_token_embeddings(pipe, [""])
    w1 = uce_weights(w0, c[2:3], null, None, 0.5)
    reg = 0.1
    c_prime = derive_embedding(w0, w1, c, reg)
    grad = sum(w1[n].T @ (w1[n] @ c_prime.T - w0[n] @ c.T) for n in w0) + reg * c_prime.T
    assert grad.norm() < 1e-8 * c.norm()  # the normal equations of min Σ‖W′c′ − Wc‖² + λ‖c′‖², row by row


def test_mace_cfr_aligns_prefix_suffix_and_pads_and_remaps_them(model):
    from erasekit.methods.mace_cfr import matching_rows, refinement_rows

    pipe = model.pipeline
    # "a photo of van gogh , detailed" vs "a photo of art , detailed": BOS + 3 shared words, ", detailed" + EOS
    old = cf.token_ids(pipe, "a photo of Van Gogh, detailed")
    new = cf.token_ids(pipe, "a photo of art, detailed")
    rows_old, rows_new = matching_rows(old, new, 77)
    assert rows_old == [0, 1, 2, 3, 6, 7, 8, *range(9, 77)]
    assert rows_new == [0, 1, 2, 3, 5, 6, 7, *range(8, 76)]
    config = make_config("mace-cfr", None, "object")  # λ 100; with λ 0 (styles) a plain least-squares fit
    patch = erasekit.erase(model, ["circle"], "mace-cfr", config=config)
    sources, targets = refinement_rows(pipe, ["circle"], config)
    w0 = kv_weights(model)
    for name, w in edited(patch, w0).items():
        assert (sources @ w.T - targets @ w0[name].T).norm() < 0.5 * (sources - targets).matmul(
            w0[name].T
        ).norm()


def test_esd_loss_decreases_on_a_fixed_sample(model):
    from erasekit.denoising import encode_prompts, sample_until
    from erasekit.methods.common import frozen, trainable_copies
    from erasekit.methods.esd import esd_loss, parameter_names

    pipe = model.pipeline
    with frozen(pipe.unet, pipe.text_encoder):
        params = trainable_copies(pipe.unet, parameter_names(pipe.unet, "attn2"))
        with torch.no_grad():
            emb = {"c": encode_prompts(pipe, ["circle"]), "null": encode_prompts(pipe, [""])}
        emb["from"] = emb["c"]
        x_t, t = sample_until(
            pipe,
            emb["c"],
            emb["null"],
            steps=4,
            stop=2,
            guidance=3.0,
            generator=torch.Generator().manual_seed(0),
        )
        opt = torch.optim.Adam(params.values(), lr=2e-4)
        losses = []
        for _ in range(8):
            loss = esd_loss(pipe.unet, params, x_t, t, emb, eta=2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_sampler_is_seeded_and_stops_where_asked(model):
    from erasekit.denoising import encode_prompts, sample_until

    pipe = model.pipeline
    c, u = encode_prompts(pipe, ["circle"]), encode_prompts(pipe, [""])

    def run(stop):
        g = torch.Generator().manual_seed(3)
        return sample_until(pipe, c, u, steps=5, stop=stop, guidance=3.0, generator=g)

    x0, t0 = run(0)
    assert torch.equal(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)))
    (xa, ta), (xb, tb) = run(3), run(3)
    assert torch.equal(xa, xb) and ta == tb < t0
    with pytest.raises(ValueError):
        run(5)


def test_prefix_hook_replaces_only_the_prefix_rows(model):
    from erasekit.denoising import encode_prompts, prefix_embeddings, with_prefix

    pipe, enc = model.pipeline, model.components["text_encoder"]
    prompt = with_prefix("circle", 2)
    assert cf.n_tokens(pipe, prompt) == 3
    ids = pipe.tokenizer(prompt).input_ids
    own = enc.get_input_embeddings().weight[ids[1:3]].detach()
    with torch.no_grad():
        plain = encode_prompts(pipe, [prompt])
        with prefix_embeddings(enc, own):
            same = encode_prompts(pipe, [prompt])
        with prefix_embeddings(enc, own + 1.0):
            other = encode_prompts(pipe, [prompt])
    assert torch.allclose(plain, same, atol=1e-6)
    assert torch.equal(other[:, 0], plain[:, 0]) and not torch.allclose(other[:, 1:], plain[:, 1:])
    assert torch.equal(encode_prompts(pipe, [prompt]), plain)  # the hook is gone


def test_advunlearn_attack_lowers_its_loss(model):
    import torch.nn.functional as F

    from erasekit.denoising import encode_prompts, predict_noise, prefix_embeddings, with_prefix
    from erasekit.methods.advunlearn import attack
    from erasekit.methods.common import frozen

    pipe = model.pipeline
    config = make_config("advunlearn", attack_steps=10, attack_lr=0.05)
    with frozen(pipe.unet, pipe.text_encoder), torch.no_grad():
        x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        want = predict_noise(pipe.unet, x_t, 500, encode_prompts(pipe, ["a dog"]))

    def loss(delta):
        with torch.no_grad(), prefix_embeddings(pipe.text_encoder, delta):
            return F.mse_loss(
                predict_noise(pipe.unet, x_t, 500, encode_prompts(pipe, [with_prefix("circle", 1)])), want
            )

    with frozen(pipe.unet, pipe.text_encoder):
        delta0 = torch.zeros(1, 32)
        delta = attack(pipe, "circle", delta0, lambda: (x_t, torch.tensor(500), want), config)
    assert loss(delta) < loss(delta0)


def test_fewshot_images_from_minicanvas_and_folders(tmp_path):
    from PIL import Image

    from erasekit.errors import ErasekitError
    from erasekit.methods.fewshot_te import folder_images, minicanvas_images

    shots = minicanvas_images("watercolor", 3, seed=1)
    assert len(shots) == 3 and all(s.shape == (32, 32, 3) and s.dtype == np.uint8 for s in shots)
    assert all(np.array_equal(a, b) for a, b in zip(shots, minicanvas_images("watercolor", 3, seed=1)))
    (tmp_path / "cat").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "cat" / f"{i}.png")
    got = folder_images(str(tmp_path), "cat", 2)
    assert [int(g[0, 0, 0]) for g in got] == [0, 40]
    with pytest.raises(ErasekitError, match="no images"):
        folder_images(str(tmp_path / "empty"), "dog", 2)


def test_bad_configs_are_one_line_errors():
    from erasekit.errors import ErasekitError

    for method, bad in [
        ("esd-x", {"parameters": "attn"}),
        ("uce", {"projections": ("to_q",)}),
        ("speed", {"alpha": 0.0}),
        ("advunlearn", {"trainable": "block-1"}),
        ("mace-cfr", {"templates": ("no placeholder",)}),
    ]:
        with pytest.raises(ErasekitError, match="invalid"):
            make_config(method, **bad)


def test_sdxl_is_refused_by_unet_training_methods(loaded):
    from erasekit.errors import ErasekitError

    model = loaded("sdxl")
    with pytest.raises(ErasekitError, match="supports sd15, sd2"):
        erasekit.erase(model, ["circle"], "esd-x", iterations=1)


def test_fewshot_ascent_raises_the_textual_inversion_loss_of_its_images(model):
    import torch.nn.functional as F

    from erasekit.denoising import encode_prompts, noised
    from erasekit.methods.fewshot_te import encode_images, erase_fewshot_te

    pipe = model.pipeline
    config = make_config("fewshot-te", epochs=6, n_images=2, lr=1e-2, templates=("a photo of a {}",))
    patch = erase_fewshot_te(model, ["circle"], config, images=gradient_image_source)
    # 64 fixed draws: text barely steers a random tiny UNet, so the loss must be averaged over many
    x0 = encode_images(pipe, gradient_image_source("circle", 2, config.seed)).repeat(32, 1, 1, 1)
    x_t, target, t = noised(pipe, x0, torch.Generator().manual_seed(5))

    @torch.no_grad()
    def ti_loss() -> float:
        emb = encode_prompts(pipe, ["a photo of a circle"] * x0.shape[0])
        return F.mse_loss(pipe.unet(x_t, t, encoder_hidden_states=emb).sample, target).item()

    before = ti_loss()
    with patch.applied(model):
        after = ti_loss()
    assert after > before and ti_loss() == before


def test_every_block_ablation_refuses_encoders_of_different_depths(tiny_sdxl_te_dir):
    from erasekit.errors import ErasekitError

    model = erasekit.load(tiny_sdxl_te_dir)
    with pytest.raises(ErasekitError, match="one depth"):
        erasekit.erase(model, ["circle"], "hirm-ablate-all", steps=1)
    patch = erasekit.erase(model, ["circle"], "hirm-ablate-last", steps=1)  # -1 resolves per encoder
    assert {k.split("/")[0] for k in patch.tensors} == {"text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_esd_erased_jointly_over_eta_is_each_eta_erased_alone(model, method):
    from erasekit.registry import erase_jointly, make_config

    def config(eta, **extra):
        return make_config(method, "paper", "object", iterations=3, ddim_steps=4, lr=1e-3, negative_guidance=eta,
                           **extra)  # fmt: skip

    configs = [config(1.0), config(8.0)]
    joint = erase_jointly(model, ["circle"], method, configs)
    alone = [erasekit.erase(model, ["circle"], method, config=c) for c in configs]
    for j, a in zip(joint, alone, strict=True):
        assert j.method == a.method and j.config == a.config and set(j.tensors) == set(a.tensors)
        for name, tensor in a.tensors.items():
            assert torch.allclose(j.tensors[name], tensor, rtol=0, atol=1e-6), name
    moved = max((joint[0].tensors[n] - joint[1].tensors[n]).abs().max().item() for n in joint[0].tensors)
    assert moved > 1e-4  # each η trained its own copy
    with pytest.raises(erasekit.ErasekitError, match="differ only in negative_guidance"):
        erase_jointly(model, ["circle"], method, [configs[0], config(8.0, seed=1)])
    with pytest.raises(erasekit.ErasekitError, match="no joint eraser"):
        erase_jointly(model, ["circle"], "uce", [make_config("uce", "paper", "object")])
