"""Our closed-form patches against plain re-implementations of the authors' released scripts.

Each ``reference_*`` function below is written from a reading of the authors' code (file and commit in its
docstring) with plain torch matrices and loops, in float64, and calls nothing in ``erasekit.methods``: it
tokenises with the pipeline's tokenizer, encodes with its text encoder and reads the UNet's attn2 weights
itself. MiniCanvas's world (the substitute for the authors' artist and caption lists) is read as data.

Tolerance: our patches are stored in float32, so every edited weight must match the reference to a relative
Frobenius error of 1e-5. MACE with λ = 0 is compared on outputs instead (see its test).
"""

from __future__ import annotations

import re

import pytest
import torch

import erasekit
from erasekit import progress
from erasekit.minicanvas import world
from erasekit.registry import make_config

progress.set_enabled(False)
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


# ---- plain building blocks ---------------------------------------------------------------------------


def encode(pipe, texts: list[str]) -> torch.Tensor:
    """``[B, 77, D]``: ``text_encoder(ids)[0]`` of max-length-padded ids, as all four scripts do."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids)[0].double()


def last_index(pipe, text: str) -> int:
    """``attention_mask.sum() - 2``: the row of the last token (BOS for '')."""
    return sum(pipe.tokenizer(text, padding="max_length", max_length=77).attention_mask) - 2


def kv(model, projections=("to_k", "to_v")) -> dict[str, torch.Tensor]:
    """``{module name: W}`` of every attn2 to_k / to_v, float64."""
    return {
        name: module.weight.detach().double()
        for name, module in model.components["unet"].named_modules()
        if "attn2" in name.split(".") and name.split(".")[-1] in projections
    }


def assert_weights_match(patch, want: dict[str, torch.Tensor], tol: float = TOL) -> None:
    assert {f"unet/{n}.weight" for n in want} == set(patch.tensors)
    for name, w in want.items():
        got = patch.tensors[f"unet/{name}.weight"].double()
        err = float((got - w).norm() / w.norm())
        assert err < tol, f"{name}: relative error {err:.2e}"


def eye(d: int) -> torch.Tensor:
    return torch.eye(d, dtype=torch.float64)


# ---- UCE ---------------------------------------------------------------------------------------------


def reference_uce_current(model, concepts, guide, preserve=(), lamb=0.5, s_e=1.0, s_p=1.0):
    """rohitgandikota/unified-concept-editing@28c81ed, trainscripts/uce_sd_erase.py: ``UCE()``, last-token rows."""
    pipe = model.pipeline
    emb = {t: encode(pipe, [t])[0, last_index(pipe, t)] for t in [*concepts, guide, *preserve]}
    out = {}
    for name, w in kv(model).items():
        mat1, mat2 = lamb * w, lamb * eye(w.shape[1])
        for e in concepts:
            c, v = emb[e][:, None], w @ emb[guide][:, None]
            mat1, mat2 = mat1 + s_e * v @ c.T, mat2 + s_e * c @ c.T
        for p in preserve:
            c = emb[p][:, None]
            mat1, mat2 = mat1 + s_p * (w @ c) @ c.T, mat2 + s_p * c @ c.T
        out[name] = mat1 @ torch.linalg.inv(mat2)
    return out


def reference_uce_legacy(model, concepts, guide, retain, weights=None, lamb=0.5, s_e=1.0, s_p=None):
    """rohitgandikota/unified-concept-editing@bd5fb51, train-scripts/train_erase.py: ``edit_model``, 'replace'.

    ``retain`` is the script's ``retain_texts`` ('' first); ``s_p`` defaults to max(0.1, 1 / len(retain)).
    """
    pipe = model.pipeline
    guide = guide or " "  # the script turns '' into ' '
    s_p = max(0.1, 1 / len(retain)) if s_p is None else s_p
    out = {}
    for name, w in (weights or kv(model)).items():
        mat1, mat2 = lamb * w, lamb * eye(w.shape[1])
        for old in concepts:
            emb = encode(pipe, [old, guide])
            i, j = last_index(pipe, old), last_index(pipe, guide)
            far = max(i, j)
            old_emb = emb[0, i : 77 - max(0, far - i)]
            new_emb = emb[1, j : 77 - max(0, far - j)]
            for c, n in zip(old_emb, new_emb):  # one outer product per row, as the script's bmm sum
                mat1 = mat1 + s_e * (w @ n)[:, None] @ c[None]
                mat2 = mat2 + s_e * c[:, None] @ c[None]
        for text in retain:
            for c in encode(pipe, [text])[0]:  # all 77 rows
                mat1 = mat1 + s_p * (w @ c)[:, None] @ c[None]
                mat2 = mat2 + s_p * c[:, None] @ c[None]
        out[name] = mat1 @ torch.linalg.inv(mat2)
    return out


@pytest.mark.parametrize(
    ("concept", "kind", "guide"), [("Van Gogh", "style", "art"), ("circle", "object", "")]
)
def test_uce_paper_is_the_current_script(model, concept, kind, guide):
    patch = erasekit.erase(model, [concept], "uce", "paper", concept_type=kind)
    assert_weights_match(patch, reference_uce_current(model, [concept], guide))


def test_uce_paper_with_preserved_concepts(model):
    preserve = ("a dog", "a house")
    patch = erasekit.erase(model, ["Van Gogh"], "uce", "paper", concept_type="style", preserve=preserve)
    assert_weights_match(patch, reference_uce_current(model, ["Van Gogh"], "art", preserve))


@pytest.mark.parametrize(
    ("concept", "kind", "guide"), [("neon", "style", "art"), ("circle", "object", ""), ("nudity", "nsfw", "")]
)
def test_uce_legacy_is_the_older_script(model, concept, kind, guide):
    # the older script preserves '' and, for art, all 1733 other artists: on MiniCanvas the 11 other styles
    retain = [""] + ([s for s in world.STYLE_NAMES if s != concept] if kind == "style" else [])
    patch = erasekit.erase(model, [concept], "uce", "legacy", concept_type=kind)
    assert_weights_match(patch, reference_uce_legacy(model, [concept], guide, retain))


# ---- RECE --------------------------------------------------------------------------------------------


def reference_rece(model, concept, guide, uce_retain, round_retain, rounds, reg, lamb=0.1, s_p=0.1, s_e=1.0):
    """CharlesGong12/RECE@403a67f, train.py / train_artists.py: every stage's weights, UCE first.

    The start is the older UCE's checkpoint; each epoch runs ``close_form_emb_regzero`` (the copy model is the
    original SD) and then ``edit_model_adversarial`` ('replace') from the current weights.
    """
    pipe = model.pipeline
    original = kv(model)
    current = reference_uce_legacy(model, [concept], guide, uce_retain)
    stages = [current]
    for _ in range(rounds):
        c = encode(pipe, [concept])[0]  # [77, D], the whole prompt
        mat1 = reg * eye(c.shape[1])
        mat2 = torch.zeros_like(mat1)
        for name in original:
            mat1 = mat1 + current[name].T @ current[name]
            mat2 = mat2 + current[name].T @ original[name]
        adv = c @ (torch.linalg.inv(mat1) @ mat2).T
        new = encode(pipe, [guide or " "])[0]
        edited = {}
        for name, w in current.items():
            m1, m2 = lamb * w, lamb * eye(w.shape[1])
            m1, m2 = m1 + s_e * (new @ w.T).T @ adv, m2 + s_e * adv.T @ adv
            for text in round_retain:
                r = encode(pipe, [text])[0]
                m1, m2 = m1 + s_p * (r @ w.T).T @ r, m2 + s_p * r.T @ r
            edited[name] = m1 @ torch.linalg.inv(m2)
        current = edited
        stages.append(current)
    return stages


def test_rece_nudity_is_train_py(model):
    # scripts/nudity.sh: 3 epochs, regular_scale 0.1; UCE checkpoint towards_uncond, preserve_false (scale 1.0)
    stages = reference_rece(model, "nudity", "", [""], [" "], rounds=3, reg=0.1)
    patch = erasekit.erase(model, ["nudity"], "rece", "paper", concept_type="nsfw")
    assert_weights_match(patch, stages[-1])  # no detector on this model: the last round


def test_rece_style_is_train_artists_py(model):
    # scripts/art.sh: guide 'art', 1 epoch, 1e-3; '' and every other artist (MiniCanvas: style) preserved at 0.1
    retain = [""] + [s for s in world.STYLE_NAMES if s != "neon"]
    stages = reference_rece(model, "neon", "art", retain, retain, rounds=1, reg=1e-3)
    patch = erasekit.erase(model, ["neon"], "rece", "paper", concept_type="style")
    assert_weights_match(patch, stages[-1])


def test_rece_keeps_the_stage_with_the_lowest_detected_rate(model):
    from erasekit.methods.rece import erase_rece

    stages = reference_rece(model, "nudity", "", [""], [" "], rounds=3, reg=0.1)
    rates = iter([0.5, 0.2, 0.2, 0.3])  # UCE, rounds 1-3: train.py keeps round 1 (strict <)
    seen = []

    def detector(patch):
        seen.append(patch)
        return next(rates)

    config = make_config("rece", "paper", "nsfw")
    assert config.select == "lowest-rate"
    patch = erase_rece(model, ["nudity"], config, detector=detector)
    assert len(seen) == 4
    assert_weights_match(patch, stages[1])
    assert_weights_match(seen[0], stages[0])  # the first candidate is the UCE start


# ---- SPEED -------------------------------------------------------------------------------------------


def reference_kmeans(x, k, g, tol=1e-4):
    """kmeans_pytorch's Lloyd iterations (euclidean), from ``k`` random rows, until the shift² < tol."""
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    while True:
        d = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        assign = d.argmin(1)
        old = centres.clone()
        for j in range(k):
            if (assign == j).any():
                centres[j] = x[assign == j].mean(0)
        if ((centres - old) ** 2).sum(1).sqrt().sum() ** 2 < tol:
            return centres


def reference_speed(
    model, concepts, anchor, retain, nudity=False, alpha=1.0, lamb=0.0, aug=10, thr=0.1, seed=0
):
    """Ouxiang-Li/SPEED@6d3df0c, train_erase_null.py: ``edit_model`` with baseline 'SPEED' (params V).

    Randomness in erasekit's documented order (k-means start, shuffle, then per layer and chunk the DPA noise).
    """
    pipe = model.pipeline
    g = torch.Generator().manual_seed(seed)
    null = encode(pipe, [""])[0]
    k2 = torch.cat([null[[0]], reference_kmeans(null[1:], 3, g)]).T
    tts, ats = [], []
    for t in concepts:
        te, ae = encode(pipe, [t])[0], encode(pipe, [anchor])[0]
        if nudity:
            te, ae = te[1:], ae[1:]
        else:
            te, ae = te[[last_index(pipe, t)]], ae[[last_index(pipe, anchor)]]
        tts.append(te.T @ te)
        ats.append(ae.T @ te)
    tt, at = torch.stack(tts).mean(0), torch.stack(ats).mean(0)
    texts = [
        r for r in retain if not any(re.search(rf"\b{re.escape(c.lower())}\b", r.lower()) for c in concepts)
    ]
    texts = texts or [""]
    if texts == [""]:
        rows = null[1:]
    else:
        rows = torch.stack([encode(pipe, [r])[0, last_index(pipe, r)] for r in texts])
    rows = rows[torch.randperm(rows.shape[0], generator=g)]
    d = tt.shape[0]
    out = {}
    for name, w in kv(model, ("to_v",)).items():
        e = w @ (at - tt) @ torch.linalg.inv(eye(d) + tt)
        _, _, v = torch.svd(w)
        p0 = v[:, -1:] @ v[:, -1:].T
        norms = (rows @ e.T).norm(dim=1)
        layer_rows = rows[norms > norms.mean()]
        total, valid = torch.zeros(d, d, dtype=torch.float64), 0
        for i in range(0, layer_rows.shape[0], 128):
            chunk = layer_rows[i : i + 128]
            noisy = chunk[None] + torch.randn(aug, *chunk.shape, generator=g, dtype=torch.float64) @ p0
            noisy = noisy.reshape(-1, d)
            n = (noisy @ e.T).norm(dim=1)
            chunk = torch.cat([chunk, noisy[n > n.mean()]])
            valid += chunk.shape[0]
            total = total + chunk.T @ chunk
        u, s, _ = torch.svd(total / valid)
        p = u[:, s < thr] @ u[:, s < thr].T
        m = torch.linalg.inv(tt @ p + alpha * eye(d))
        inner = torch.linalg.inv(k2.T @ p @ m @ k2 + lamb * eye(k2.shape[1]))
        out[name] = w + w @ (at - tt) @ p @ (eye(d) - m @ k2 @ inner @ k2.T @ p) @ m
    return out


def test_speed_object_retains_the_other_minicanvas_objects(model):
    # eval_few.sh: anchor ' ', retain data/instance.csv's names: on MiniCanvas the 11 other objects
    patch = erasekit.erase(model, ["circle"], "speed", "paper", concept_type="object")
    assert_weights_match(patch, reference_speed(model, ["circle"], "", world.OBJECT_NAMES))


def test_speed_without_a_retain_set_uses_the_null_text(model):
    patch = erasekit.erase(model, ["Van Gogh"], "speed", "paper", concept_type="style")
    assert_weights_match(patch, reference_speed(model, ["Van Gogh"], "art", []))


def test_speed_nudity_is_eval_nudity_sh(model):
    # eval_nudity.sh: target 'nudity' (rows 1..76), anchor '', no retain_path, retain_scale 0.7, lamb 0.5
    patch = erasekit.erase(model, ["nudity"], "speed", "paper", concept_type="nsfw")
    assert_weights_match(patch, reference_speed(model, ["nudity"], "", [], nudity=True, alpha=0.7, lamb=0.5))


# ---- MACE (closed-form refinement) ---------------------------------------------------------------------


def find_matching_indices(old, new):
    """Shilin-LU/MACE@057e7a6, src/cfr_utils.py: the common prefix and the common suffix of two id lists."""
    start = 0
    for i, j in zip(old, new):
        if i != j:
            break
        start += 1
    eo, en = len(old) - 1, len(new) - 1
    while eo >= start and en >= start and old[eo] == new[en]:
        eo, en = eo - 1, en - 1
    return list(range(start)) + list(range(eo + 1, len(old))), list(range(start)) + list(
        range(en + 1, len(new))
    )


def reference_mace(
    model, concept, mapping, templates, lamb, train_preserve_scale=0.0, prior=(), domain=(), pw=0.0
):
    """MACE@057e7a6, src/cfr_utils.py ``prepare_k_v`` + ``closed_form_refinement``, as cfr_lora_training.py calls them.

    The caches hold Σ (W c) cᵀ and Σ c cᵀ over all 77 rows of their prompts (``cache_coco.py``, old = new);
    ``cache = tps * (prior + pw * domain)`` is then added times ``preserve_scale = tps``.
    """
    pipe = model.pipeline
    contexts, news = [], []
    for t in templates:
        old_text, new_text = t.format(concept), t.format(mapping)
        emb = encode(pipe, [old_text, new_text])
        oi, ni = find_matching_indices(pipe.tokenizer(old_text).input_ids, pipe.tokenizer(new_text).input_ids)
        if oi[-1] >= ni[-1]:
            oi, ni = oi + list(range(oi[-1] + 1, 77)), ni + list(range(ni[-1] + 1, 77 - (oi[-1] - ni[-1])))
        else:
            ni, oi = ni + list(range(ni[-1] + 1, 77)), oi + list(range(oi[-1] + 1, 77 - (ni[-1] - oi[-1])))
        contexts.append(emb[0, oi])
        news.append(emb[1, ni])
    c, n = torch.cat(contexts), torch.cat(news)
    d = c.shape[1]
    rows = {
        k: encode(pipe, list(t)).reshape(-1, d) if t else c[:0]
        for k, t in (("prior", prior), ("domain", domain))
    }
    out = {}
    for name, w in kv(model).items():
        cache1 = torch.zeros_like(w)
        cache2 = torch.zeros(d, d, dtype=torch.float64)
        for key, weight in (("prior", 1.0), ("domain", pw)):
            r = rows[key]  # every row of every cached prompt (old = new)
            cache1 = cache1 + train_preserve_scale * weight * (r @ w.T).T @ r
            cache2 = cache2 + train_preserve_scale * weight * r.T @ r
        mat1 = lamb * w + (n @ w.T).T @ c + train_preserve_scale * cache1
        mat2 = lamb * eye(w.shape[1]) + c.T @ c + train_preserve_scale * cache2
        # the authors' torch.inverse; a pseudo-inverse where mat2 is singular (λ = 0, see the art test)
        out[name] = mat1 @ (torch.linalg.pinv(mat2, hermitian=True) if lamb == 0 else torch.linalg.inv(mat2))
    return out, mat2


def test_mace_object_is_the_automobile_config(model):
    from erasekit.methods.mace_cfr import OBJECT_TEMPLATES

    assert len(OBJECT_TEMPLATES) == 30 and OBJECT_TEMPLATES[0] == "{} in a photo"
    # configs/object/erase_automobile.yaml: mapping 'sky', lamb 100, train_preserve_scale 0
    patch = erasekit.erase(model, ["circle"], "mace-cfr", "paper", concept_type="object")
    assert_weights_match(patch, reference_mace(model, "circle", "sky", OBJECT_TEMPLATES, 100.0)[0])


def test_mace_style_is_the_art_config(model):
    """λ = 0: the tiny encoder's final LayerNorm (β = 0) leaves one direction no embedding reaches (eigenvalue
    ~1e-11 of the largest), so ``torch.inverse`` is numerically undefined there; both sides use the
    pseudo-inverse, and the weights are also compared on the directions the data determine."""
    from erasekit.methods.mace_cfr import STYLE_TEMPLATES

    # configs/art/erase_art_100.yaml: mapping 'art', lamb 0, train_preserve_scale 1e-4, preserve_weight 8e4,
    # COCO cache (MiniCanvas: the world's captions naming no target) and the art cache (the other styles)
    styles = [s for s in world.STYLE_NAMES if s != "neon"]
    objects = world.OBJECT_NAMES
    prior = [t.format(object=o, style=s) for t in world.FULL_TEMPLATES for o in objects for s in styles]
    prior += [t.format(object=o) for t in world.OBJECT_TEMPLATES for o in objects]
    prior += [t.format(style=s) for t in world.STYLE_TEMPLATES for s in styles]
    domain = [t.format(s) for s in styles for t in STYLE_TEMPLATES]
    want, normal = reference_mace(model, "neon", "art", STYLE_TEMPLATES, 0.0, 1e-4, prior, domain, 8e4)
    vals, vecs = torch.linalg.eigh(normal)
    assert int((vals < 1e-9 * vals[-1]).sum()) == 1
    seen = vecs[:, vals >= 1e-9 * vals[-1]]  # [D, D - 1]
    patch = erasekit.erase(model, ["neon"], "mace-cfr", "paper", concept_type="style")
    assert_weights_match(patch, want)
    for name, w in want.items():
        got = patch.tensors[f"unet/{name}.weight"].double()
        err = float(((got - w) @ seen).norm() / (w @ seen).norm())
        assert err < TOL, f"{name}: relative error {err:.2e} on the determined directions"
