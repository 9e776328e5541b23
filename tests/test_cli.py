"""Every user-error path of the CLI gives one line on stderr and exit status 2; the happy paths work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel

from erasekit.cli.main import main
from erasekit.models.tokenizer import clip_tokenizer
from erasekit.patch import CONFIG_FILE, TENSOR_FILE, Patch
from tests.test_patch import tiny_encoder

FAST = ["--steps", "2"]


@pytest.fixture(scope="module")
def te_dir(tmp_path_factory) -> Path:
    """A model folder holding only text_encoder/ and tokenizer/: valid for text-encoder methods."""
    root = tmp_path_factory.mktemp("te-only")
    tiny_encoder(0).save_pretrained(root / "text_encoder")
    clip_tokenizer().save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def other_te_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("te-other")
    tiny_encoder(1).save_pretrained(root / "text_encoder")
    clip_tokenizer().save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def patch_dir(te_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("patches") / "vg"
    code = main(["--quiet", "erase", "--model", str(te_dir), "--concept", "Van Gogh", "--method", "hirm-r",
                 "--preset", "paper", *FAST, "--out", str(out)])  # fmt: skip
    assert code == 0
    return out


def run_error(capsys, argv: list[str], match: str) -> str:
    code = main(["--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and match in err, err
    return err


def test_erase_writes_patch(patch_dir):
    meta = json.loads((patch_dir / CONFIG_FILE).read_text())
    assert meta["method"] == "hirm-r" and meta["concepts"] == ["Van Gogh"]
    assert meta["config"]["steps"] == 2 and meta["erase_seconds"] > 0
    assert all(".layers.0." in k for k in meta["fingerprints"])


def test_missing_model(capsys, tmp_path):
    run_error(capsys, ["erase", "--model", str(tmp_path / "nope"), "--concept", "x", "--method", "hirm-r",
                       "--out", str(tmp_path / "o")], "no model at")  # fmt: skip


def test_unknown_method(capsys, te_dir, tmp_path):
    run_error(capsys, ["erase", "--model", str(te_dir), "--concept", "x", "--method", "hirm-z",
                       "--out", str(tmp_path / "o")], "unknown method 'hirm-z'")  # fmt: skip


@pytest.mark.parametrize("concept", ["", "   "])
def test_empty_concept(capsys, te_dir, tmp_path, concept):
    run_error(capsys, ["erase", "--model", str(te_dir), "--concept", concept, "--method", "hirm-r",
                       "--out", str(tmp_path / "o")], "non-empty")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_concept_too_long(capsys, te_dir, tmp_path):
    run_error(capsys, ["erase", "--model", str(te_dir), "--concept", "cat " * 80, "--method", "hirm-r",
                       "--out", str(tmp_path / "o")], "truncated")  # fmt: skip


def test_bad_option_value(capsys, te_dir, tmp_path):
    run_error(capsys, ["erase", "--model", str(te_dir), "--concept", "x", "--method", "hirm-r", "--steps", "many",
                       "--out", str(tmp_path / "o")], "bad value 'many' for --steps")  # fmt: skip


def test_unknown_preset(capsys, te_dir, tmp_path):
    run_error(capsys, ["erase", "--model", str(te_dir), "--concept", "x", "--method", "hirm-r", "--preset", "nope",
                       "--out", str(tmp_path / "o")], "no preset 'nope'")  # fmt: skip


def test_existing_output_is_kept(capsys, te_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    run_error(capsys, ["erase", "--model", str(te_dir), "--concept", "x", "--method", "hirm-r",
                       "--out", str(out)], "already exists")  # fmt: skip
    assert (out / "mine.txt").read_text() == "precious"


def test_wrong_base(capsys, patch_dir, other_te_dir, tmp_path):
    run_error(capsys, ["apply", "--model", str(other_te_dir), "--patch", str(patch_dir),
                       "--out", str(tmp_path / "o")], "wrong base model")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_corrupt_patch(capsys, patch_dir, te_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_FILE).write_text((patch_dir / CONFIG_FILE).read_text())
    (bad / TENSOR_FILE).write_bytes((patch_dir / TENSOR_FILE).read_bytes()[:100])
    run_error(capsys, ["apply", "--model", str(te_dir), "--patch", str(bad), "--out", str(tmp_path / "o")],
              "corrupt patch")  # fmt: skip


def test_missing_required_flag(capsys):
    run_error(capsys, ["erase", "--concept", "x"], "required")


def test_apply_export_import_round_trip(patch_dir, te_dir, tmp_path):
    assert (
        main(
            [
                "--quiet",
                "apply",
                "--model",
                str(te_dir),
                "--patch",
                str(patch_dir),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    applied = CLIPTextModel.from_pretrained(tmp_path / "m" / "text_encoder")
    patch = Patch.load(patch_dir)
    for key, value in patch.tensors.items():
        assert torch.equal(applied.get_parameter(key.split("/", 1)[1]), value)
    assert (
        main(
            [
                "--quiet",
                "export",
                "--model",
                str(te_dir),
                "--patch",
                str(patch_dir),
                "--out",
                str(tmp_path / "te"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--quiet",
                "import",
                "--model",
                str(te_dir),
                "--from",
                str(tmp_path / "te"),
                "--out",
                str(tmp_path / "p2"),
            ]
        )
        == 0
    )
    back = Patch.load(tmp_path / "p2")
    assert set(back.tensors) == set(patch.tensors)
    assert all(torch.equal(back.tensors[k], patch.tensors[k]) for k in patch.tensors)


def test_methods_and_env_list_hirm(capsys):
    assert main(["methods", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert "hirm-r" in names and "hirm-s" in names
    assert main(["methods", "hirm-r", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "paper" in info["presets"] and any(o["name"] == "steps" for o in info["options"])
    assert main(["env", "--json"]) == 0
    assert "hirm-r" in json.loads(capsys.readouterr().out)["methods"]


def test_generate_is_deterministic(tiny_sd15_dir, tmp_path):
    from tests.fixtures.evaluation_tiny import assert_images_close, pixels

    argv = ["--quiet", "generate", "--model", str(tiny_sd15_dir), "--prompt", "a cat", "--num", "2",
            "--steps", "2", "--seed", "7", "--batch-size", "1"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0  # the same call: the same bytes
    assert main([*argv[:-1], "2", "--out", str(tmp_path / "b")]) == 0  # another batch size
    names = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert names == ["00000_seed7.png", "00001_seed8.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # another batch may round a pixel value the other way, never by more than one level (erasekit.generation)
    assert_images_close(pixels(tmp_path / "a"), pixels(tmp_path / "b"))
    assert (tmp_path / "a" / names[0]).read_bytes() != (tmp_path / "a" / names[1]).read_bytes()


def test_generate_needs_a_pipeline(capsys, te_dir, tmp_path):
    run_error(capsys, ["generate", "--model", str(te_dir), "--prompt", "a cat", "--out", str(tmp_path / "o")],
              "not a full pipeline")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_apply_to_full_pipeline(tiny_sd15_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    patch = tmp_path / "p"
    assert main(["--quiet", "erase", "--model", str(tiny_sd15_dir), "--concept", "cat", "--method", "hirm-r",
                 *FAST, "--out", str(patch)]) == 0  # fmt: skip
    assert (
        main(
            [
                "--quiet",
                "apply",
                "--model",
                str(tiny_sd15_dir),
                "--patch",
                str(patch),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    for key, value in Patch.load(patch).tensors.items():
        assert torch.equal(pipe.text_encoder.get_parameter(key.split("/", 1)[1]), value)
