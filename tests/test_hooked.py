"""The hooked artifact: round trip, exact removal, strict loading, no clobbering, composition, and its users."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from erasekit.denoising import encode_prompts
from erasekit.errors import ErasekitError
from erasekit.evaluation.record import model_fingerprint
from erasekit.generation import Request, Sampling, render
from erasekit.hooked import MODULE_FILE, AddedModule, HookedPatch, HookSpec, compose, load_erasure
from erasekit.hooks import HOOK_KINDS
from erasekit.hooks.adapters import LowRankAdapter, low_rank_config_for
from erasekit.methods.spm import transformer_layers
from erasekit.patch import CONFIG_FILE, TENSOR_FILE, Patch
from erasekit.registry import config_to_dict
from tests.fixtures.evaluation_tiny import one_thread, tiny_model, tiny_patch  # noqa: F401

TWO_STEPS = Sampling(steps=2, guidance=7.5)
PROMPTS = ["A circle image in neon style.", "A star image in pixel style."]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_artifact(
    model, seed: int = 0, kind: str = "prompt_gate", scale: float = 0.3, **gate
) -> HookedPatch:
    """Seeded random rank-1 adapters on every transformer-block layer, gated by one hook of ``kind``."""
    g = torch.Generator().manual_seed(seed)
    unet, modules = model.components["unet"], []
    for name in transformer_layers(unet):
        config = low_rank_config_for(unet.get_submodule(name), 1, 1.0)
        with torch.device("meta"):
            shapes = LowRankAdapter(config).state_dict()
        tensors = {k: scale * torch.randn(v.shape, generator=g) for k, v in shapes.items()}
        modules.append(AddedModule.attached_to(model, f"unet/{name}", "low_rank_adapter", config_to_dict(config),
                                               tensors))  # fmt: skip
    hook = HookSpec(
        name="ft", kind=kind, config={"prompts": ["neon"], **gate}, gates=tuple(m.name for m in modules)
    )
    return HookedPatch(modules=tuple(modules), hooks=(hook,), method="test-hooked", concepts=("neon",),
                       base_model=model.source)  # fmt: skip


def latents(model, prompts=PROMPTS, sampling=TWO_STEPS) -> torch.Tensor:
    requests = [Request(seed=3 + i, prompt=p) for i, p in enumerate(prompts)]
    return torch.stack(render(model.pipeline, requests, sampling, output="latent", desc=None))


def merged_at(model, artifact: HookedPatch, s: float) -> Patch:
    """The plain computation: W + s·ΔW for every adapter, as a Patch."""
    unet, new = model.components["unet"], {}
    for m in artifact.modules:
        name = m.attach.split("/", 1)[1]
        up, down = m.tensors["up.weight"].flatten(1), m.tensors["down.weight"]  # [out, 1], [1, in, ...]
        new[f"{name}.weight"] = unet.get_submodule(name).weight.detach() + s * torch.einsum(
            "or,r...->o...", up, down
        )
    return Patch.from_tensors(model, "unet", new)


def plain_s(model, prompt: str, target: str = "neon") -> float:
    """Facilitated Transport's s written out: max(cosine of flattened embeddings, token overlap fraction)."""
    tok, enc = model.pipeline.tokenizer, model.pipeline.text_encoder
    ids = tok(
        [prompt, target], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        e = enc(ids)[0].flatten(1)
    special = set(tok.all_special_ids)
    mine, theirs = set(ids[0].tolist()) - special, set(ids[1].tolist()) - special
    cos = float(torch.dot(e[0], e[1]) / (e[0].norm() * e[1].norm()))
    return max(cos, len(mine & theirs) / len(theirs))


# ---- round trip, removal, refusal ------------------------------------------------------------------------


def test_round_trip_and_exact_removal(model, tmp_path):
    art = dataclasses.replace(random_artifact(model), patch=tiny_patch(model, scale=0.5))
    loaded = load_erasure(art.save(tmp_path / "h"))
    assert isinstance(loaded, HookedPatch) and loaded.fingerprint() == art.fingerprint()
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == [CONFIG_FILE, MODULE_FILE, TENSOR_FILE]
    text = (tmp_path / "h" / CONFIG_FILE).read_text()
    meta = json.loads(text)
    assert (
        text == json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        and meta["kind"] == "hooked"
    )
    assert meta["hooks"][0]["attach"] == ["unet", "text_encoder"] and len(meta["modules"]) == len(art.modules)
    for a, b in zip(art.modules, loaded.modules):
        assert (a.name, a.config, a.fingerprints) == (b.name, b.config, b.fingerprints)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    before_weights, before = model_fingerprint(model.components), latents(model)
    handle = loaded.apply_(model)
    during = latents(model)
    handle.remove()
    assert not torch.allclose(before, during)
    assert torch.equal(before, latents(model)) and model_fingerprint(model.components) == before_weights
    unet = model.components["unet"]
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_a_wrong_base_is_refused_and_leaves_nothing_behind(model):
    other = tiny_model(seed=1)
    with pytest.raises(ErasekitError, match="wrong base model"):
        random_artifact(model).apply_(other)
    assert all(not m._forward_hooks for m in other.components["unet"].modules())


def test_loading_is_strict(model, tmp_path):
    from safetensors.torch import load_file, save_file

    good = random_artifact(model).save(tmp_path / "good")

    def broken(name: str, edit=None, weights=None):
        import shutil

        where = tmp_path / name
        shutil.copytree(good, where)
        if edit is not None:
            meta = json.loads((where / CONFIG_FILE).read_text())
            edit(meta)
            (where / CONFIG_FILE).write_text(json.dumps(meta))
        if weights is not None:
            save_file(weights(load_file(str(where / MODULE_FILE))), str(where / MODULE_FILE))
        return where

    def set_type(meta):
        meta["modules"][0]["type"] = "mystery_net"

    def set_kind(meta):
        meta["hooks"][0]["kind"] = "sampler_magic"

    def extra_key(meta):
        meta["modules"][0]["config"]["activation"] = "gelu"

    cases = {
        "unknown module type 'mystery_net'": broken("type", set_type),
        "unknown hook kind 'sampler_magic'": broken("kind", set_kind),
        "unknown config key": broken("key", extra_key),
        "lacks": broken("missing", weights=lambda w: dict(list(w.items())[1:])),
        "unexpected tensors": broken("extra", weights=lambda w: {**w, "stray/down.weight": torch.zeros(1)}),
    }
    for match, where in cases.items():
        with pytest.raises(ErasekitError, match=match):
            load_erasure(where)
    pickled = broken("pickle")
    (pickled / "modules.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ErasekitError, match="refusing to load pickled"):
        load_erasure(pickled)
    with pytest.raises(ErasekitError, match="load it with erasekit.load_erasure"):
        Patch.load(good)


def test_saving_never_clobbers(model, tmp_path):
    art = random_artifact(model)
    art.save(tmp_path / "h")
    with pytest.raises(ErasekitError, match="already exists"):
        art.save(tmp_path / "h")
    assert load_erasure(art.save(tmp_path / "h", overwrite=True)).fingerprint() == art.fingerprint()


def test_patch_files_stay_patches(model, tmp_path):
    patch = tiny_patch(model, scale=0.5)
    where = patch.save(tmp_path / "p")
    meta = json.loads((where / CONFIG_FILE).read_text())
    assert meta["kind"] == "patch"
    del meta["kind"]  # a patch written before the field existed
    (where / CONFIG_FILE).write_text(json.dumps(meta))
    assert isinstance(load_erasure(where), Patch)
    (where / CONFIG_FILE).write_text(json.dumps({**meta, "kind": "spell"}))
    with pytest.raises(ErasekitError, match="unknown artifact kind 'spell'"):
        load_erasure(where)


# ---- composition ---------------------------------------------------------------------------------------


def test_composes_with_patches_and_refuses_what_it_cannot(model, monkeypatch):
    art, te = random_artifact(model), tiny_patch(model, scale=0.5)
    both = compose([art, te], label="spm+hirm")
    assert isinstance(both, HookedPatch) and set(both.tensors) == set(te.tensors)
    assert both.components == ["text_encoder", "unet"] and both.method == "test-hooked+test-scale"
    with both.applied(model):
        stacked = latents(model)
    # tensors first, then modules and hooks: the gate measures prompts with the patched encoder
    with te.applied(model), art.applied(model):
        assert torch.allclose(stacked, latents(model), atol=1e-6)
    assert isinstance(compose([te]), Patch) and compose([art]) is art
    # two gated artifacts: each hook gates its own adapters
    two = compose([art, random_artifact(model, seed=1)])
    assert [h.name for h in two.hooks] == ["0:ft", "1:ft"] and len(two.modules) == 2 * len(art.modules)
    # a patch changing a tensor an adapter depends on
    key = f"{art.modules[0].attach}.weight"
    weight = model.components["unet"].get_submodule(art.modules[0].attach.split("/", 1)[1]).weight
    unet_patch = Patch.from_tensors(model, "unet", {key.split("/", 1)[1]: weight + 1})
    with pytest.raises(ErasekitError, match=f"cannot stack x: a patch changes {key}, which the added module"):
        compose([unet_patch, art], label="x")
    # two hooks that both change what they attach to
    monkeypatch.setitem(HOOK_KINDS, "test_gate", dataclasses.replace(HOOK_KINDS["prompt_gate"], name="test_gate",
                                                                     modifies=True))  # fmt: skip
    with pytest.raises(ErasekitError, match="both hook unet"):
        compose([random_artifact(model, kind="test_gate"), random_artifact(model, seed=1)])


# ---- Facilitated Transport -----------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [1, 2])
def test_ft_scales_each_prompt_as_the_plain_computation(model, exponent):
    art = random_artifact(model, exponent=exponent)
    prompts = ["neon", "a neon circle", "a pixel star", "a square"]
    with art.applied(model):
        batched = latents(model, prompts)  # one pipeline call: the scale is per image
        unguided = latents(model, prompts[2:3], Sampling(steps=2, guidance=1.0))
    for i, prompt in enumerate(prompts):
        s = plain_s(model, prompt)
        assert (s == 1.0) == ("neon" in prompt)
        with merged_at(model, art, s**exponent).applied(model):
            alone = render(
                model.pipeline, [Request(seed=3 + i, prompt=prompt)], TWO_STEPS, output="latent", desc=None
            )
        assert torch.allclose(batched[i], alone[0], atol=1e-5), prompt
    with merged_at(model, art, plain_s(model, prompts[2]) ** exponent).applied(model):
        assert torch.allclose(
            unguided, latents(model, prompts[2:3], Sampling(steps=2, guidance=1.0)), atol=1e-5
        )


def test_ft_reads_learned_conditioning_by_its_cosine(model):
    from erasekit.hooks.prompt_gate import PromptGateConfig, PromptGateState, encode_targets, permeability

    pipe, gate_config = model.pipeline, PromptGateConfig(prompts=("neon",))
    targets = encode_targets(pipe.tokenizer, pipe.text_encoder, gate_config.prompts)
    state = PromptGateState(targets, gate_config, gate=None)
    cond = encode_prompts(pipe, ["a neon circle"]) + 0.01  # never seen by the encoder hook
    (s,) = state.row_scores(cond).tolist()
    assert s == pytest.approx(permeability(None, cond[0], targets, "clipcos")) and s < 1.0


# ---- users: generate, eval, attack, apply, the bench -----------------------------------------------------


@pytest.fixture(scope="module")
def spm_dir(tiny_sd15_dir, tmp_path_factory):
    import erasekit

    model = erasekit.load(tiny_sd15_dir)
    art = erasekit.erase(model, ["neon"], "spm", iterations=3, ddim_steps=3, warmup=0, lr=1e-2)
    return art.save(tmp_path_factory.mktemp("spm") / "neon")


def test_generate_eval_and_attack_use_the_hooked_pipeline(tiny_sd15_dir, spm_dir, tmp_path):
    from erasekit.attacks.run import run_attack
    from erasekit.cli.main import main
    from erasekit.evaluation.protocols import evaluate
    from erasekit.models.loading import load
    from tests.fixtures.evaluation_tiny import fake_classifier

    prompt, seed = PROMPTS[0], 188
    gen = ["--quiet", "generate", "--model", str(tiny_sd15_dir), "--prompt", prompt, "--seed", str(seed), "--steps",
           "2", "--guidance", "7.5", "--batch-size", "1"]  # fmt: skip
    assert main([*gen, "--patch", str(spm_dir), "--out", str(tmp_path / "gen")]) == 0
    assert main([*gen, "--out", str(tmp_path / "base")]) == 0
    assert json.loads((tmp_path / "gen" / "generation.json").read_text())["patches"][0]["kind"] == "hooked"
    model, art = load(tiny_sd15_dir), load_erasure(spm_dir)
    file = tmp_path / "p.txt"
    file.write_text(prompt + "\n")
    evaluate(model, "prompts", tmp_path / "eval", prompts=str(file), detector="classifier", target="neon", seeds=1,
             sampling=TWO_STEPS, batch_size=1, classifier=fake_classifier(), patches=[art])  # fmt: skip
    metrics = run_attack(model, "neon", "encoder-swap", tmp_path / "attack", budget={"prompts": 1}, seeds=1,
                         sampling=TWO_STEPS, batch_size=1, classifier=fake_classifier(), patches=[art])  # fmt: skip
    generated = (tmp_path / "gen" / f"00000_seed{seed}.png").read_bytes()
    assert generated != (tmp_path / "base" / f"00000_seed{seed}.png").read_bytes()
    assert (tmp_path / "eval" / "images" / f"p00000_s{seed}.png").read_bytes() == generated
    # encoder swap keeps the UNet-side adapters and the gate (it only reads the encoder): the same image
    assert (tmp_path / "attack" / "images" / f"c0000_s{seed}.png").read_bytes() == generated
    assert metrics["patch_generated_with"]["kind"] == "hooked" and metrics["stats"]["dropped_modules"] == 0
    record = json.loads((tmp_path / "eval" / "record.json").read_text())
    assert record["patches"][0]["kind"] == "hooked" and record["patches"][0]["sha256"] == art.fingerprint()


def test_cli_eval_and_attack_accept_it(tiny_sd15_dir, spm_dir, tmp_path, capsys):
    from erasekit.cli.main import main
    from erasekit.minicanvas.classifier import MiniCanvasClassifier

    MiniCanvasClassifier(width=8).save(tmp_path / "clf")
    common = ["--model", str(tiny_sd15_dir), "--patch", str(spm_dir), "--steps", "2", "--classifier",
              str(tmp_path / "clf")]  # fmt: skip
    assert main(["--quiet", "attack", *common, "--attack", "synonyms", "--concept", "neon", "--budget", "prompts=1",
                 "--seeds", "1", "--out", str(tmp_path / "attack")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "attack" / "metrics.json").read_text())
    assert metrics["patch_under_attack"]["kind"] == "hooked"
    prompts = tmp_path / "p.txt"
    prompts.write_text("A circle image in neon style.\n")
    assert main(["--quiet", "eval", *common, "--protocol", "prompts", "--prompts", str(prompts), "--detector",
                 "classifier", "--target", "neon", "--seeds", "1", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "eval" / "record.json").read_text())["patches"][0]["kind"] == "hooked"


@pytest.mark.parametrize("command", ["apply", "export"])
def test_apply_and_export_refuse_it_in_one_line(tiny_sd15_dir, spm_dir, tmp_path, capsys, command):
    from erasekit.cli.main import main

    assert main(["--quiet", command, "--model", str(tiny_sd15_dir), "--patch", str(spm_dir), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hooked artifact" in err and not (tmp_path / "o").exists()


def test_the_bench_stores_and_stacks_it(model, tmp_path, monkeypatch):
    from erasekit.bench import BenchSettings, Layout, parse_entries
    from erasekit.bench.cells import Bench
    from erasekit.registry import get_method
    from tests.fixtures.evaluation_tiny import OBJECTS, STYLES, fake_classifier

    monkeypatch.setitem(get_method("spm").presets, "budget", {"iterations": 2, "ddim_steps": 3, "warmup": 0})
    bench = Bench(model, Layout(tmp_path), BenchSettings(seeds=1, steps=2, objects=OBJECTS, styles=STYLES),
                  fake_classifier())  # fmt: skip
    stack = parse_entries(["spm:budget+hirm-s:paper"])[0]
    made, _ = bench.entry_patch(stack, "neon", "style")
    again, _ = bench.entry_patch(stack, "neon", "style")  # read back from DIR/patches with load_erasure
    assert isinstance(made, HookedPatch) and made.components == ["text_encoder", "unet"]
    assert again.fingerprint() == made.fingerprint()
    with pytest.raises(ErasekitError, match="which the added module"):
        bench.entry_patch(parse_entries(["spm:budget+uce:paper"])[0], "neon", "style")
