"""The ``eraseeval`` protocol: EraseEval's metrics against plain computations, its combined score, and the
protocol end to end on the tiny pipeline with fake classifiers."""

from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.evaluation import eraseeval_metrics as em
from erasekit.evaluation.protocols import PROTOCOLS, evaluate
from erasekit.evaluation.record import model_fingerprint
from erasekit.generation import Sampling
from tests.fixtures.evaluation_tiny import (
    OBJECTS,
    STYLES,
    fake_classifier,
    one_thread,  # noqa: F401  (autouse: tiny models on one thread)
    tiny_model,
    tiny_patch,
)

TWO_STEPS = Sampling(steps=2, guidance=3.0)


# ---- the combined score ------------------------------------------------------------------------------------


def plain(parts: list[float], rule: str) -> float:
    if rule == "geometric":
        return statistics.geometric_mean(parts) if min(parts) > 0 else 0.0
    return statistics.harmonic_mean(parts)


@pytest.mark.parametrize("rule", em.COMBINE)
def test_combined_score_falls_when_any_part_falls(rule):
    rng = random.Random(0)
    for _ in range(500):
        parts = [rng.uniform(0.01, 1.0) for _ in range(4)]
        score = em.combined_score(parts, rule)
        assert score == pytest.approx(plain(parts, rule), rel=1e-12)
        assert min(parts) <= score <= statistics.fmean(parts) + 1e-12  # never above the plain average
        i = rng.randrange(4)
        lower = [p * rng.uniform(0.05, 0.99) if j == i else p for j, p in enumerate(parts)]
        assert em.combined_score(lower, rule) < score
        assert em.combined_score([0.0 if j == i else p for j, p in enumerate(parts)], rule) == 0.0


def test_combined_score_clips_parts_and_checks_its_rule():
    assert em.combined_score([1.3, 1.0, 1.0, 1.0]) == 1.0
    assert em.combined_score([-0.2, 0.9, 0.9, 0.9], "harmonic") == 0.0
    assert em.combined_score([0.5] * 4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="combine must be one of"):
        em.combined_score([0.5] * 4, "median")


# ---- M1..M4 against plain computations ---------------------------------------------------------------------


def test_paired_similarity_is_the_mean_over_pairs_with_detected_images_at_zero():
    g = torch.Generator().manual_seed(0)
    base, erased = torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g)
    shows = [False, True, False, False]
    want = np.mean([0.0 if shows[j] else float(np.dot(b, e) / (np.linalg.norm(b) * np.linalg.norm(e)))
                    for b in base.double().numpy() for j, e in enumerate(erased.double().numpy())])  # fmt: skip
    assert em.paired_similarity(base, erased, shows) == pytest.approx(want, rel=1e-9)
    assert em.paired_similarity(base, erased, [True] * 4) == 0.0
    assert em.paired_similarity(base[:1], base[:1], [False]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        em.paired_similarity(base, erased, shows[:3])


def released_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """cmmd.py's estimator written out: normalised rows, exp(-γ‖a−b‖²) averaged, k_xx + k_yy − 2 k_xy, × 1000."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    gamma = 1 / (2 * 10.0**2)

    def k(a, b):
        return np.mean([[math.exp(-gamma * float(np.sum((u - v) ** 2))) for v in b] for u in a])

    return 1000 * (k(x, x) + k(y, y) - 2 * k(x, y))


def test_cmmd_is_the_released_estimator():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g) + 0.5
    assert em.cmmd(x, y) == pytest.approx(released_cmmd(x.double().numpy(), y.double().numpy()), rel=1e-9)
    assert em.cmmd(x, x) == pytest.approx(0.0, abs=1e-9) and em.cmmd(x, y) > 0
    assert em.cmmd(3 * x, y) == pytest.approx(em.cmmd(x, y))  # rows are normalised first


def test_ratio_and_distance_scores():
    assert (
        em.ratio_score(0.8, 0.4) == 0.5
        and em.ratio_score(0.5, 0.9) == 1.0
        and em.ratio_score(0.0, 0.3) == 1.0
    )
    assert em.distance_score(2.0, 2.0) == 1.0 and em.distance_score(2.0, 3.0) == 0.5
    assert em.distance_score(2.0, 1.0) == 1.0 and em.distance_score(2.0, 5.0) == 0.0
    assert (em.distance_score(0.0, 0.0), em.distance_score(0.0, 0.1)) == (1.0, 0.0)


# ---- the protocol ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def biased_classifier(style: str):
    """The fake classifier with a style head that always predicts ``style`` (the object head as it is)."""
    clf = fake_classifier()
    head = clf.module.style_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([10.0 if s == style else 0.0 for s in STYLES]))
    return clf


def run(model, out, patches=(), classifier=None, **fields):
    return evaluate(model, "eraseeval", out, patches=list(patches), sampling=TWO_STEPS,
                    classifier=classifier or fake_classifier(), target=fields.pop("target", "neon"), **fields)  # fmt: skip


def test_eraseeval_end_to_end(model, tmp_path):
    before = model_fingerprint(model.components)
    out = tmp_path / "run"
    metrics = run(model, out, [tiny_patch(model)])
    assert model_fingerprint(model.components) == before
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    parts = [metrics[k] for k in ("M1", "M2", "M3", "M4")]
    assert all(0.0 <= p <= 1.0 for p in parts) and metrics["EraseEval"] == em.combined_score(parts)
    assert metrics["images"] == {"target": 6, "related": 12, "retain": 6}  # 3 x 2 seeds, 2 synonyms, 6 cells
    base = [json.loads(line) for line in (out / "base" / "manifest.jsonl").read_text().splitlines()]
    assert len(base) == 24 and all((out / "base" / e["file"]).is_file() for e in base)
    d = metrics["details"]
    assert (
        d["M1"]["prompts"] == 3 and d["M2"]["prompts"] == 6 and d["M4"]["reference"] == "minicanvas renders"
    )
    assert d["M4"]["reference_images"] == 6 and set(d["M2"]["related_base_rate"]) == {
        "glowing",
        "fluorescent",
    }
    record = json.loads((out / "record.json").read_text())
    assert record["protocol"] == "eraseeval" and len(record["patches"]) == 1
    with pytest.raises(ErasekitError, match="holds a finished run"):
        run(model, out, [tiny_patch(model)])
    again = run(model, out, [tiny_patch(model)], overwrite=True)
    assert again["M3"] == pytest.approx(metrics["M3"]) and again["M4"] == pytest.approx(metrics["M4"])


def test_a_run_without_patches_is_its_own_base(model, tmp_path):
    metrics = run(model, tmp_path / "run")
    assert metrics["M3"] == 1.0 and metrics["M4"] == 1.0 and not (tmp_path / "run" / "base").exists()
    m1 = metrics["details"]["M1"]
    assert m1["concept_rate_base"] == m1["concept_rate_erased"]


def test_the_detector_zeroes_m1_and_m2_and_so_the_score(model, tmp_path):
    seen = run(model, tmp_path / "seen", [tiny_patch(model)], classifier=biased_classifier("neon"))
    assert (seen["M1"], seen["M2"], seen["EraseEval"]) == (0.0, 0.0, 0.0)
    assert seen["details"]["M2"]["verified"] and seen["details"]["M1"]["concept_rate_erased"] == 100.0
    unseen = run(model, tmp_path / "unseen", [tiny_patch(model)], classifier=biased_classifier("pixel"))
    assert unseen["M1"] > 0.0 and unseen["M2"] > 0.0 and unseen["EraseEval"] > 0.0
    assert not unseen["details"]["M2"]["verified"]  # no synonym shows neon on the base: all are kept
    assert unseen["details"]["M2"]["kept"] == ["glowing", "fluorescent"]


def test_a_reference_folder_replaces_the_world_renders(model, tmp_path):
    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    metrics = run(model, tmp_path / "run", [tiny_patch(model)], reference=str(folder), combine="harmonic")
    assert (
        metrics["details"]["M4"]["reference"] == str(folder)
        and metrics["details"]["M4"]["reference_images"] == 4
    )
    parts = [metrics[k] for k in ("M1", "M2", "M3", "M4")]
    assert metrics["combine"] == "harmonic" and metrics["EraseEval"] == em.combined_score(parts, "harmonic")


def test_bad_settings_are_one_line_errors(model, tmp_path):
    with pytest.raises(ErasekitError, match="needs a target concept"):
        PROTOCOLS.config("eraseeval", None, None, {})
    with pytest.raises(ErasekitError, match="combine must be one of"):
        PROTOCOLS.config("eraseeval", None, None, {"target": "neon", "combine": "median"})
    with pytest.raises(ErasekitError, match="no object or style class 'mosaic'"):
        run(model, tmp_path / "a", target="mosaic")
    outside = fake_classifier(objects=("dog", "cat", "bird"))
    with pytest.raises(ErasekitError, match="needs --reference"):
        run(model, tmp_path / "b", classifier=outside)


# ---- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory, model):
    from erasekit.minicanvas.classifier import MiniCanvasClassifier

    root = tmp_path_factory.mktemp("eraseeval-cli")
    model.pipeline.save_pretrained(root / "model")
    tiny_patch(model, scale=0.0).save(root / "patch")
    torch.manual_seed(0)
    MiniCanvasClassifier(width=8, object_names=OBJECTS, style_names=STYLES).save(root / "classifier")
    return root


def _eval(assets, out, *extra):
    from erasekit.cli.main import main

    return main(["--quiet", "eval", "--model", str(assets / "model"), "--out", str(out), "--steps", "2",
                 "--classifier", str(assets / "classifier"), "--protocol", "eraseeval", *extra])  # fmt: skip


def test_cli_eval_eraseeval(assets, tmp_path, capsys):
    code = _eval(
        assets, tmp_path / "run", "--patch", str(assets / "patch"), "--target", "square", "--seeds", "1"
    )
    assert code == 0, capsys.readouterr().err
    assert "EraseEval=" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["target_type"] == "object" and set(metrics) >= {"EraseEval", "M1", "M2", "M3", "M4"}
    assert metrics["images"] == {"target": 3, "related": 6, "retain": 6}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "needs a target concept (--target NAME)"),
        (("--target", "neon", "--combine", "median"), "combine must be one of geometric, harmonic"),
        (("--target", "neon", "--grid-seeds", "0"), "seeds and grid_seeds must be at least 1"),
        (("--target", "mosaic"), "no object or style class 'mosaic'"),
    ],
)
def test_cli_errors_are_one_line(assets, tmp_path, capsys, extra, message):
    assert _eval(assets, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_target_without_related_prompts_or_other_cells_is_a_one_line_error():
    from erasekit.evaluation.protocols.eraseeval import eraseeval_jobs

    with pytest.raises(ErasekitError, match="synonyms"):
        eraseeval_jobs("zebra", "object", ["zebra", "cup"], ["neon"], [0], [0])
    with pytest.raises(ErasekitError, match="other objects and styles"):
        eraseeval_jobs("fish", "object", ["fish"], ["neon"], [0], [0])
    assert eraseeval_jobs("fish", "object", ["fish", "cup"], ["neon"], [0], [0])
