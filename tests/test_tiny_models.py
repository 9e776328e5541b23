"""Every family's tiny model builds, saves, loads, encodes prompts and generates; full-size configs are exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import erasekit
from erasekit.cli.main import main
from erasekit.errors import ErasekitError
from erasekit.models.families import num_blocks
from erasekit.models.t5tokenizer import t5_tokenizer
from erasekit.models.tiny import (
    build_components,
    component_config,
    component_names,
    count_parameters,
    write_model,
)
from erasekit.patch import Patch
from tests.conftest import FAMILY_NAMES, TE_ONLY

PIPELINES = {
    "sd15": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
# encode_prompt output shapes, from the tiny configs: CLIP hidden 32 (L) / 48 (bigG), T5 d_model 96
ENCODED = {
    "sd15": [(1, 77, 32), (1, 77, 32)],  # prompt, negative
    "sd2": [(1, 77, 32), (1, 77, 32)],
    "sdxl": [(1, 77, 80), (1, 77, 80), (1, 48), (1, 48)],  # 32+48 concatenated; bigG's pooled projection
    "sd3": [(1, 77 + 16, 96), (1, 77 + 16, 96), (1, 80), (1, 80)],  # CLIP padded to T5 width, then T5 tokens
    "flux": [(1, 16, 96), (1, 32), (16, 3)],  # T5 sequence, CLIP-L pooled, text position ids
}
# published parameter counts of the real architectures
FULL_PARAMS = {
    ("sd15", "text_encoder"): 123_060_480,  # CLIP ViT-L/14 text tower
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd2", "text_encoder"): 340_387_840,  # OpenCLIP ViT-H/14, 23 of 24 blocks
    ("sd2", "unet"): 865_910_724,
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP ViT-bigG/14 with projection
    ("sdxl", "unet"): 2_567_463_684,
    ("sd3", "transformer"): 2_028_328_000,
    ("sd3", "text_encoder_3"): 4_762_310_656,  # T5 v1.1 XXL encoder
    ("flux", "transformer"): 11_901_408_320,
}


def encode(pipe, family: str) -> tuple:
    """The pipeline's own ``encode_prompt``, called as each family's pipeline expects."""
    if family in ("sd15", "sd2"):
        return pipe.encode_prompt("a cat", "cpu", 1, True)
    if family == "sdxl":
        return pipe.encode_prompt(
            "a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    if family == "sd3":
        return pipe.encode_prompt(
            "a cat", None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=16
        )
    return pipe.encode_prompt("a cat", None, device="cpu", max_sequence_length=16)


def generate(pipe, family: str, seed: int = 0) -> np.ndarray:
    kwargs = {"max_sequence_length": 16} if family in ("sd3", "flux") else {}
    gen = torch.Generator().manual_seed(seed)
    out = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="np", generator=gen, **kwargs)
    return out.images


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_loads_encodes_and_generates(family, tiny_model_dir):
    model = erasekit.load(tiny_model_dir(family))
    assert model.family.name == family
    assert type(model.pipeline).__name__ == PIPELINES[family]
    assert set(model.components) >= set(component_names(family))
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in encode(model.pipeline, family)]
    assert shapes == ENCODED[family]
    with torch.no_grad():
        first, again = generate(model.pipeline, family), generate(model.pipeline, family)
    assert first.shape == (1, 16, 16, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)  # same seed, same image


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_text_encoder_only_folder_loads_without_pipeline(family, tiny_model_dir):
    model = erasekit.load(tiny_model_dir(family, TE_ONLY[family]))
    assert model.pipeline is None and model.family.name == family
    assert set(model.components) == set(TE_ONLY[family].split(","))
    encoders = model.clip_encoders()
    assert [name for name, _, _ in encoders] == list(model.family.clip_encoders)
    for _, encoder, tokenizer in encoders:
        ids = tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            assert encoder(ids).last_hidden_state.shape[:2] == (1, 77)
    with pytest.raises(ErasekitError, match="not a full pipeline"):
        model.require_pipeline()


def test_model_index_names_the_pipeline_and_every_component(tiny_sd15_te_dir):
    index = json.loads((tiny_sd15_te_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]  # named though not written
    assert index["safety_checker"] == [None, None]
    assert not (tiny_sd15_te_dir / "unet").exists()
    assert list((tiny_sd15_te_dir / "text_encoder").glob("*.safetensors"))


def test_tiny_encoders_differ_in_depth_and_padding():
    sd15 = build_components("sd15", components="text_encoder,tokenizer")
    sd2 = build_components("sd2", components="text_encoder,tokenizer")
    assert num_blocks(sd2["text_encoder"]) > num_blocks(sd15["text_encoder"])  # block-index bugs show
    assert sd15["tokenizer"].pad_token_id == 49407 and sd2["tokenizer"].pad_token_id == 0  # "!" pads SD2
    assert sd2["text_encoder"].config.hidden_act == "gelu"


CLIP_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
FULL_CLIP = {  # (family, component): (hidden, blocks, heads, MLP, activation, projection)
    ("sd15", "text_encoder"): (768, 12, 12, 3072, "quick_gelu", 768),  # CLIP ViT-L/14
    ("sd2", "text_encoder"): (1024, 23, 16, 4096, "gelu", 512),  # OpenCLIP ViT-H/14, penultimate layer
    ("sdxl", "text_encoder"): (768, 12, 12, 3072, "quick_gelu", 768),
    ("sdxl", "text_encoder_2"): (1280, 32, 20, 5120, "gelu", 1280),  # OpenCLIP ViT-bigG/14
    ("sd3", "text_encoder"): (768, 12, 12, 3072, "quick_gelu", 768),
    ("sd3", "text_encoder_2"): (1280, 32, 20, 5120, "gelu", 1280),
    ("flux", "text_encoder"): (768, 12, 12, 3072, "quick_gelu", 768),
}


@pytest.mark.parametrize(("family", "component"), sorted(FULL_CLIP))
def test_full_size_clip_configs_are_exact(family, component):
    config = component_config(family, component, "full")
    assert tuple(config[k] for k in (*CLIP_KEYS, "projection_dim")) == FULL_CLIP[family, component]
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49408, 77)


@pytest.mark.parametrize(("family", "component"), sorted(FULL_PARAMS))
def test_full_size_parameter_counts_match_the_published_models(family, component):
    assert count_parameters(family, component, "full") == FULL_PARAMS[family, component]


def test_full_size_clip_l_builds_with_real_weights():
    encoder = build_components("sd15", "full", ["text_encoder"])["text_encoder"]
    assert sum(p.numel() for p in encoder.parameters()) == FULL_PARAMS["sd15", "text_encoder"]
    assert num_blocks(encoder) == 12
    assert 0.01 < encoder.embeddings.token_embedding.weight.std().item() < 0.03  # initializer_range 0.02


@pytest.mark.parametrize(
    ("family", "component"), [("flux", "transformer"), ("sd3", "transformer"), ("sd3", "text_encoder_3")]
)
def test_too_large_components_are_refused_before_allocating(family, component, tmp_path):
    with pytest.raises(ErasekitError, match="too large to build"):
        write_model(family, tmp_path / "m", "full", [component])
    assert not (tmp_path / "m").exists()


def test_seed_gives_identical_weights():
    a, b, c = (build_components("sdxl", components="text_encoder_2,unet", seed=s) for s in (0, 0, 1))
    for name in ("text_encoder_2", "unet"):
        sa, sb, sc = (m[name].state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_component_seeds_do_not_depend_on_the_selection():
    alone = build_components("sd15", components=["unet"])["unet"].state_dict()
    together = build_components("sd15")["unet"].state_dict()
    assert all(torch.equal(alone[k], together[k]) for k in alone)


def test_write_never_clobbers(tmp_path):
    out = write_model("sd15", tmp_path / "m", components="text_encoder,tokenizer", seed=0)
    with pytest.raises(ErasekitError, match="already exists"):
        write_model("sd15", out, components="tokenizer")
    write_model("sd15", out, components="tokenizer", overwrite=True)
    assert not (out / "text_encoder").exists() and (out / "tokenizer").is_dir()


def test_unknown_family_size_and_component_are_errors(tmp_path):
    with pytest.raises(ErasekitError, match="unknown family"):
        build_components("sd9")
    with pytest.raises(ErasekitError, match="unknown size"):
        build_components("sd15", "huge", ["text_encoder"])
    with pytest.raises(ErasekitError, match="unknown component"):
        build_components("flux", components="text_encoder_3")


def test_t5_stand_in_tokenizer_follows_t5_conventions(tmp_path):
    tok = t5_tokenizer()
    ids = tok("A painting of Van Gogh, 1889!").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.unk_token_id not in ids  # every printable ASCII character has a piece
    assert len(tok) == 1100 and "<extra_id_0>" in tok.get_vocab()
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again("A painting of Van Gogh, 1889!").input_ids == ids
    assert (
        t5_tokenizer()("a red apple").input_ids == tok("a red apple").input_ids
    )  # training is deterministic


# ---- the CLI ---------------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["--quiet", *argv])
    except SystemExit as e:  # argparse rejects bad choices by exiting
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tiny_model_writes_and_info_describes(tmp_path, capsys):
    out = tmp_path / "sdxl"
    code, stdout, _ = run(
        capsys,
        "tiny-model",
        "--family",
        "sdxl",
        "--components",
        TE_ONLY["sdxl"],
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert code == 0 and "sdxl" in stdout
    assert erasekit.load(out).family.name == "sdxl"
    code, stdout, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["family"] == "sdxl" and info["random_init"]["seed"] == 3
    assert info["components"]["text_encoder_2"]["parameters"] == count_parameters("sdxl", "text_encoder_2")
    assert info["components"]["unet"]["present"] is False
    layout = info["clip_encoders"]["text_encoder_2"]
    assert (layout["blocks"], layout["hidden_size"], layout["prefix"]) == (4, 48, "text_model.")
    assert layout["last_attention_out"] == "text_model.encoder.layers.3.self_attn.out_proj"
    code, stdout, _ = run(capsys, "info", str(out))
    assert code == 0 and "SDXL" in stdout and "4 blocks, hidden 48" in stdout


def test_cli_info_on_a_patch(tmp_path, capsys, tiny_sd15_te_dir):
    model = erasekit.load(tiny_sd15_te_dir)
    name = "encoder.layers.0.mlp.fc1.weight"
    base = {f"text_encoder/{name}": model.components["text_encoder"].state_dict()[name]}
    patch = Patch.from_modules(
        model.components, {"text_encoder": [name]}, base, method="test", concepts=("cat",)
    )
    patch.save(tmp_path / "p")
    code, stdout, _ = run(capsys, "info", str(tmp_path / "p"), "--json")
    assert code == 0 and json.loads(stdout)["concepts"] == ["cat"] and json.loads(stdout)["tensors"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tiny-model", "--family", "flux", "--size", "full", "--components", "transformer"], "too large"),
        (["tiny-model", "--family", "sd15", "--components", "text_encoder,bogus"], "unknown component"),
        (["tiny-model", "--family", "sd9"], "invalid choice"),
        (["tiny-model", "--family", "sd15", "--size", "huge"], "invalid choice"),
    ],
)
def test_cli_tiny_model_errors(argv, message, tmp_path, capsys):
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "m"))
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_cli_tiny_model_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "tiny-model", "--family", "sd15", "--out", str(tmp_path / "m"))
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["does-not-exist", "file.txt"])
def test_cli_info_errors(target, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a model")
    code, _, err = run(capsys, "info", str(tmp_path / target))
    assert code == 2 and err.startswith("erasekit: error:") and err.count("\n") == 1
