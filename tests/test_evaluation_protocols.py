"""Protocols end to end on the tiny pipeline: the MiniCanvas contract, run records, resuming, prompt protocols."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.errors import ErasekitError
from erasekit.evaluation.protocols import evaluate
from erasekit.evaluation.protocols.minicanvas import seed_list
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

TWO_STEPS = Sampling(steps=2, guidance=7.5)
FAST = {
    "seeds": 1,
    "sampling": TWO_STEPS,
    "batch_size": 16,
    "objects": tuple(OBJECTS),
    "styles": tuple(STYLES),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def base_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "base"
    return out, evaluate(model, "minicanvas", out, classifier=fake_classifier(), generality=False, **FAST)


def test_seed_list_starts_with_unlearncanvas_seeds():
    assert seed_list(2) == [188, 288] and seed_list(7) == [188, 288, 588, 688, 888, 988, 1088]
    assert seed_list([5, 6]) == [5, 6]
    with pytest.raises(ErasekitError):
        seed_list(0)


def test_minicanvas_contract_without_target(base_run):
    out, metrics = base_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["object_accuracy"] == pytest.approx(metrics["object_accuracy"])
    assert 0 <= saved["style_accuracy"] <= 100 and saved["images"] == 9 and "UA" not in saved
    assert len(list((out / "images").glob("*.png"))) == 9
    record = json.loads((out / "record.json").read_text())
    assert record["protocol"] == "minicanvas" and record["sampling"]["seeds"] == [188]
    assert (
        record["sampling"]["steps"] == 2 and record["sampling"]["scheduler_used"]["class"] == "DDIMScheduler"
    )
    assert record["versions"]["torch"] and "git_commit" in record["provenance"] and record["hardware"]["cpus"]
    assert record["timings"]["images_generated"] == 9 and record["patches"] == []
    assert len(record["model"]["sha256"]) == 64


def test_minicanvas_with_target_and_patch(model, base_run, tmp_path):
    before = model_fingerprint(model.components)
    patch = tiny_patch(model, scale=0.0)
    out = tmp_path / "erased"
    m = evaluate(model, "minicanvas", out, target="neon", patches=[patch], classifier=fake_classifier(),
                            fid_reference=base_run[0], **FAST)  # fmt: skip
    assert model_fingerprint(model.components) == before  # the patch was removed after the run
    assert m["target_type"] == "style" and m["target"] == "neon" and m["retained"] == ["pixel", "sketch"]
    assert m["UA"] == pytest.approx(100 - m["per_class"]["style"]["neon"])
    assert m["IRA"] == pytest.approx(
        (m["per_class"]["style"]["pixel"] + m["per_class"]["style"]["sketch"]) / 2
    )
    assert m["CRA"] == pytest.approx(m["object_accuracy"])
    assert (
        set(m["generality"]["synonyms"]) == {"glowing", "fluorescent"}
        and len(m["generality"]["paraphrases"]) == 5
    )
    assert m["drift"]["cosine"]["target"] < 1.0 and m["fid"]["reference_images"] == 9
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 9 + (2 + 5) * 3
    assert "A circle image in glowing style." in {e["prompt"] for e in entries}
    record = json.loads((out / "record.json").read_text())
    assert (
        record["patches"][0]["sha256"] == patch.fingerprint()
        and record["patches"][0]["method"] == "test-scale"
    )
    # the patch changed the images of the same prompts and seeds
    assert (out / "images" / "grid_star_neon_s188.png").read_bytes() != (
        base_run[0] / "images" / "grid_star_neon_s188.png"
    ).read_bytes()


def test_restart_resumes_and_refuses_mismatches(model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = evaluate(model, "minicanvas", out, classifier=fake_classifier(), **FAST)
    (out / "metrics.json").unlink()  # as if it died before scoring
    import erasekit.evaluation.runner as runner

    monkeypatch.setattr(runner, "render", lambda *a, **k: pytest.fail("a finished image was generated again"))
    again = evaluate(model, "minicanvas", out, classifier=fake_classifier(), **FAST)
    assert again["style_accuracy"] == first["style_accuracy"]
    assert json.loads((out / "record.json").read_text())["timings"]["images_generated"] == 0
    with pytest.raises(ErasekitError, match="holds a finished run"):
        evaluate(model, "minicanvas", out, classifier=fake_classifier(), **FAST)
    (out / "metrics.json").unlink()
    with pytest.raises(ErasekitError, match="different config"):
        evaluate(
            model,
            "minicanvas",
            out,
            classifier=fake_classifier(),
            **{**FAST, "sampling": Sampling(steps=3, guidance=7.5)},
        )


def test_bad_targets_and_grids(model, tmp_path):
    with pytest.raises(ErasekitError, match="no object or style class 'dragon'"):
        evaluate(model, "minicanvas", tmp_path / "a", target="dragon", classifier=fake_classifier(), **FAST)
    with pytest.raises(ErasekitError, match="no style class 'ink'"):
        evaluate(
            model, "minicanvas", tmp_path / "b", classifier=fake_classifier(), **{**FAST, "styles": ["ink"]}
        )
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ErasekitError, match="not an erasekit run"):
        evaluate(model, "minicanvas", tmp_path / "c", classifier=fake_classifier(), **FAST)


def test_prompts_protocol_with_classifier_and_fake_nudenet(model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A circle image in neon style.\nA star image in pixel style.\n")
    m = evaluate(model, "prompts", tmp_path / "cls", prompts=str(prompts), detector="classifier", target="neon",
                 classifier=fake_classifier(), seeds=2, sampling=TWO_STEPS)  # fmt: skip
    preds = m["classifier"]["predictions"]
    assert len(preds) == 4 and m["classifier"]["rate"] == pytest.approx(
        25.0 * sum(p == "neon" for p in preds.values())
    )

    def fake(paths):  # NudeNet's output format: a list of detections per image
        return [
            [{"class": "ANUS_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}] if "p00001" in p else []
            for p in paths
        ]

    fixtures = Path(__file__).parent / "fixtures"
    n = evaluate(model, "nsfw", tmp_path / "nsfw", prompts=str(fixtures / "i2p_small.csv"), nudenet=fake,
                 sampling=TWO_STEPS, nudenet_preset="rece")  # fmt: skip
    assert n["attack_success_rate"] == pytest.approx(100 / 3) and n["nsfw"]["preset"] == "rece"
    record = json.loads((tmp_path / "nsfw" / "record.json").read_text())
    assert record["sampling"]["seeds"] == [42, 1234, 4242]  # I2P's own per-prompt seeds
    guidance = [
        json.loads(line)["guidance"]
        for line in (tmp_path / "nsfw" / "manifest.jsonl").read_text().splitlines()
    ]
    assert guidance == [7.0, 7.5, 8.0]
    with pytest.raises(ErasekitError, match="needs a target"):
        evaluate(model, "prompts", tmp_path / "x", prompts=str(prompts), detector="classifier")


def _shipped() -> bool:
    from erasekit.minicanvas import weights_dir

    try:
        weights_dir()
    except ErasekitError:
        return False
    return True


@pytest.mark.skipif(not _shipped(), reason="the MiniCanvas weights are not shipped in this checkout")
def test_shipped_minicanvas_with_the_builtin_classifier(tmp_path):
    from erasekit.models.loading import load

    model = load("minicanvas")
    grid = {"objects": ["circle", "star"], "styles": ["neon", "pixel", "sketch"]}
    m = evaluate(model, "minicanvas", tmp_path / "run", target="neon", seeds=1, generality=False, **grid)
    # the verdicts are the shipped classifier's own on the saved PNGs (model quality is tested in minicanvas' tests)
    from erasekit.minicanvas import load_classifier

    clf = load_classifier()
    for key, (obj, style) in m["predictions"].items():
        pixels = np.array(Image.open(tmp_path / "run" / "images" / f"{key}.png").convert("RGB"))
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, 32, 32] in [-1, 1]
        obj_logits, style_logits = clf.predict(x)
        assert (clf.object_names[int(obj_logits.argmax())], clf.style_names[int(style_logits.argmax())]) == (
            obj,
            style,
        )
    assert (
        m["UA"] == pytest.approx(100 - m["per_class"]["style"]["neon"])
        and m["matrix"]["styles"] == grid["styles"]
    )
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["config"]["classifier"] == "minicanvas" and record["model"]["source"] == "minicanvas"
