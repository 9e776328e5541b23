"""LEACE and R-LACE: their rows, their defining properties against plain code, and the exactness of the fold.

The plain references here use only torch and the pipeline's tokenizer, text encoder and UNet, never the
helpers in ``erasekit.methods``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import erasekit
from erasekit import progress
from erasekit.errors import ErasekitError
from erasekit.methods._projection import Rows, labelled_rows
from erasekit.methods.leace import LEACEConfig, fit_leace
from erasekit.methods.rlace import RLACEConfig, fantope_projection, logistic_fit, solve_game
from erasekit.minicanvas import world
from erasekit.registry import make_config
from tests.fixtures.evaluation_tiny import encode, one_thread  # noqa: F401

progress.set_enabled(False)


@pytest.fixture(scope="module")
def model(tiny_sd15_dir):
    return erasekit.load(tiny_sd15_dir)


def test_rows_run_from_the_concept_token_to_the_end(model):
    pipe = model.pipeline
    cfg = LEACEConfig(contrast=("cup",), templates=("a picture of a {} at night", "{}"))
    rows = labelled_rows(pipe, ["fish"], cfg, "leace")
    # plain: "a picture of a" is 4 tokens after BOS, so the concept starts at row 5; "{}" starts at row 1
    seq = encode(
        pipe, ["a picture of a fish at night", "fish", "a picture of a cup at night", "cup"]
    ).double()
    expected = torch.cat([seq[0, 5:], seq[1, 1:], seq[2, 5:], seq[3, 1:]])
    assert torch.allclose(rows.x, expected, atol=1e-6)
    assert rows.z[:, 0].tolist() == [1.0] * (72 + 76) + [0.0] * (72 + 76)


def test_world_rows_pair_every_caption_with_each_sibling(model):
    rows = labelled_rows(model.pipeline, ["fish"], LEACEConfig(), "leace")
    frames = len(world.FULL_TEMPLATES) * len(world.STYLE_NAMES) + len(world.OBJECT_TEMPLATES)
    n_concept = int(rows.z.sum())
    assert n_concept > frames and len(rows.x) == n_concept * len(
        world.OBJECT_NAMES
    )  # siblings: same token count


def test_leace_matches_the_closed_form_and_removes_the_cross_covariance():
    g = torch.Generator().manual_seed(0)
    n, d = 600, 6
    z = (torch.rand(n, generator=g) < 0.3).double()
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    x[:, 2] += 2.5 * z
    rows = Rows(x, z[:, None])
    q, mean = fit_leace(rows, LEACEConfig(shrinkage=False, constrain_cov_trace=False))
    # plain LEACE (Belrose et al., Theorem 3.1): Q = W⁺ u uᵀ W, W = Σ^{-1/2}, u spanning W Σ_xz
    xc = x - x.mean(0)
    sigma = xc.T @ xc / (n - 1)
    sigma_xz = xc.T @ (z - z.mean())[:, None] / (n - 1)
    lam, v = torch.linalg.eigh(sigma)
    w, w_inv = v @ torch.diag(lam.rsqrt()) @ v.T, v @ torch.diag(lam.sqrt()) @ v.T
    u = F.normalize(w @ sigma_xz, dim=0)
    assert torch.allclose(q, w_inv @ u @ u.T @ w, atol=1e-9)
    assert torch.allclose(mean, x.mean(0))
    erased = x - (x - mean) @ q.T
    cross = (erased - erased.mean(0)).T @ (z - z.mean())
    assert cross.abs().max() < 1e-8 * (xc.T @ (z - z.mean())).abs().max()


def unet_outputs(model, cond: torch.Tensor) -> torch.Tensor:
    unet = model.components["unet"]
    shape = (cond.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=cond).sample


SMALL = {"contrast": ("cup", "tree", "key"), "templates": ("a picture of a {}", "{} in the rain")}


@pytest.mark.parametrize(("method", "config"), [("leace", SMALL), ("rlace", {**SMALL, "max_iterations": 3})])
def test_the_fold_equals_erasing_every_conditioning_row(model, method, config):
    """The patched UNet on c gives what the base UNet gives on r(c), for any c (here: unrelated prompts)."""
    pipe = model.pipeline
    cfg = make_config(method, "paper", "object", **config)
    rows = labelled_rows(pipe, ["fish"], cfg, method)
    if method == "leace":
        q, mean = fit_leace(rows, cfg)
    else:
        q, mean = (
            solve_game(rows.x, rows.z.amax(1), cfg)[0],
            torch.zeros(rows.x.shape[1], dtype=torch.float64),
        )
    cond = encode(pipe, ["a tree in the rain", "", "fish"]).double()
    erased = (cond - (cond - mean) @ q.T).float()
    expected = unet_outputs(model, erased)
    patch = erasekit.erase(model, ["fish"], method, concept_type="object", **config)
    with patch.applied(model):
        got = unet_outputs(model, cond.float())
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unet_outputs(model, cond.float()), expected, atol=1e-4)


def test_leace_without_affine_changes_only_the_projection_weights(model):
    patch = erasekit.erase(model, ["fish"], "leace", concept_type="object", affine=False)
    assert patch.tensors and all(k.endswith(("to_k.weight", "to_v.weight")) for k in patch.tensors)


def test_fantope_projection_clips_shifted_eigenvalues_to_trace_k():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    p = (a + a.T) / 2
    for k in (1, 3):
        out = fantope_projection(p, k)
        lam, u = torch.linalg.eigh(p)
        # plain: the θ with Σ clip(λ − θ, 0, 1) = k, found on a fine grid
        grid = torch.linspace(float(lam.min()) - 1, float(lam.max()), 200001, dtype=torch.float64)
        sums = (lam[None] - grid[:, None]).clamp(0, 1).sum(1)
        theta = grid[(sums - k).abs().argmin()]
        expected = u @ torch.diag((lam - theta).clamp(0, 1)) @ u.T
        assert torch.allclose(out, expected, atol=1e-4)
        assert abs(torch.trace(out).item() - k) < 1e-5
    proj = torch.linalg.qr(a)[0][:, :2]
    assert torch.allclose(fantope_projection(proj @ proj.T, 2), proj @ proj.T, atol=1e-6)


def test_rlace_game_finds_the_planted_direction_and_defeats_a_linear_classifier():
    g = torch.Generator().manual_seed(0)
    n, d = 2000, 8
    y = (torch.rand(n, generator=g) < 0.5).float()
    x = torch.randn(n, d, generator=g)
    direction = F.normalize(torch.randn(d, generator=g), dim=0)
    x += 3.0 * (2 * y[:, None] - 1) * direction
    assert logistic_fit(x, y, 1e-4)[1] > 0.95
    cfg = RLACEConfig(contrast=("x",), max_iterations=4000, evaluate_every=200, epsilon=0.02, lr=0.05)
    removed, info = solve_game(x, y, cfg)
    assert abs(info["best_accuracy"] - info["majority"]) < 0.02 and info["rounds"] < 4000
    assert abs(direction.double() @ removed @ direction.double()) > 0.9  # U Uᵀ holds the planted direction
    kept = x.double() @ (torch.eye(d, dtype=torch.float64) - removed)
    assert logistic_fit(kept, y, 1e-4)[1] < 0.6


def test_projection_methods_need_contrast_concepts_outside_minicanvas(model):
    with pytest.raises(ErasekitError, match="contrast"):
        erasekit.erase(model, ["Van Gogh"], "leace")
    patch = erasekit.erase(model, ["Van Gogh"], "leace", contrast=("Monet", "Picasso"))
    assert patch.tensors
