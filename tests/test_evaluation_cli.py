"""`erasekit eval` and `erasekit report` on a saved tiny pipeline, a saved patch and a user classifier folder."""

import json
from pathlib import Path

import pytest

from erasekit.cli.main import main
from tests.fixtures.evaluation_tiny import (
    OBJECTS,
    STYLES,
    one_thread,  # noqa: F401  (autouse: tiny models on one thread)
    tiny_clip,
    tiny_model,
    tiny_patch,
)
from tests.test_evaluation_metrics import _save_vit_checkpoint

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model()
    model.pipeline.save_pretrained(root / "model")
    tiny_patch(model, scale=0.0).save(root / "patch")
    _save_vit_checkpoint(root / "classifier", list(OBJECTS), [*STYLES, "Photo"])
    return root


def _eval(assets, out, *extra):
    return main(
        ["--quiet", "eval", "--model", str(assets / "model"), "--out", str(out), "--steps", "2", *extra]
    )


def test_eval_minicanvas_with_patch_and_user_classifier(assets, tmp_path, capsys):
    code = _eval(assets, tmp_path / "run", "--protocol", "minicanvas", "--patch", str(assets / "patch"),
                 "--classifier", str(assets / "classifier"), "--target", "pixel", "--seeds", "1", "--scheduler", "EulerDiscreteScheduler")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("object_accuracy", "style_accuracy", "UA", "IRA", "CRA"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["target_type"] == "style" and metrics["matrix"]["styles"] == list(
        STYLES
    )  # "Photo" left out
    assert "generality" not in metrics  # synonyms come from the MiniCanvas world, not a user classifier
    assert "UA=" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["sampling"]["scheduler_used"]["class"] == "EulerDiscreteScheduler"
    assert (
        record["config"]["sampling"]["scheduler"] == "EulerDiscreteScheduler" and len(record["patches"]) == 1
    )


def test_eval_errors_are_one_line(assets, tmp_path, capsys):
    assert _eval(assets, tmp_path / "a", "--protocol", "imagenet") == 2
    assert "unknown protocol 'imagenet'" in capsys.readouterr().err
    assert _eval(assets, tmp_path / "b", "--protocol", "nsfw") == 2
    assert "needs --prompts FILE" in capsys.readouterr().err
    assert _eval(assets, tmp_path / "c", "--protocol", "coco", "--prompts", str(FIX / "coco_small.csv")) == 2
    assert "--clip" in capsys.readouterr().err


def test_eval_nsfw_with_nudenet_on_benign_prompts(assets, tmp_path):
    pytest.importorskip("nudenet")
    code = _eval(assets, tmp_path / "nsfw", "--protocol", "nsfw", "--prompts", str(FIX / "i2p_small.csv"),
                 "--limit", "2", "--nudenet-preset", "unlearndiffatk")  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "nsfw" / "metrics.json").read_text())
    assert metrics["attack_success_rate"] == 0.0 and metrics["nsfw"]["threshold"] == 0.45
    assert metrics["nsfw"]["images"] == 2 and metrics["nsfw"]["nudenet_version"]


def test_eval_coco_clip_score_and_fid_against_a_base_run(assets, tmp_path):
    clip = tiny_clip(tmp_path / "clip")
    common = ["--protocol", "coco", "--prompts", str(FIX / "coco_small.csv"), "--clip", str(clip)]
    assert _eval(assets, tmp_path / "base", *common) == 0
    code = _eval(assets, tmp_path / "erased", *common, "--patch", str(assets / "patch"),
                 "--fid-reference", str(tmp_path / "base"))  # fmt: skip
    assert code == 0
    base = json.loads((tmp_path / "base" / "metrics.json").read_text())
    erased = json.loads((tmp_path / "erased" / "metrics.json").read_text())
    assert 0 <= base["clip_score"] <= 100 and base["clip"]["images"] == 3
    assert erased["fid"]["reference_kind"] == "run" and erased["fid"]["value"] >= 0.0
