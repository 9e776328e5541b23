"""Metrics: UnlearnCanvas UA/IRA/CRA, NudeNet presets, Fréchet distance, CLIP score, text drift, classifiers."""

import json
import math

import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.evaluation.unlearncanvas_metrics import unlearncanvas_metrics
from tests.fixtures.evaluation_tiny import one_thread  # noqa: F401  (autouse: tiny models on one thread)


def _rec(o, s, po, ps):
    return {"object": o, "style": s, "pred_object": po, "pred_style": ps}


# 2 objects x 3 styles, one image per cell. Style "a" is the target.
RECORDS = [
    _rec("x", "a", "x", "b"),  # target style forgotten, object kept
    _rec("y", "a", "x", "a"),  # target style remains, object wrong
    _rec("x", "b", "x", "b"),
    _rec("y", "b", "y", "c"),  # style b wrong once
    _rec("x", "c", "x", "c"),
    _rec("y", "c", "y", "photo"),  # a class outside the grid counts as wrong
]


def test_style_target_follows_the_definitions():
    m = unlearncanvas_metrics(RECORDS, ["x", "y"], ["a", "b", "c"], target="a", target_type="style")
    assert m["UA"] == pytest.approx(50.0)  # 1 of 2 target images still "a"
    assert m["IRA"] == pytest.approx((50.0 + 50.0) / 2)  # b: 1/2, c: 1/2
    assert m["CRA"] == pytest.approx(100 * 5 / 6)  # object accuracy over all 6 images, target style included
    assert m["style_accuracy"] == pytest.approx(100 * 3 / 6) and m["object_accuracy"] == pytest.approx(
        100 * 5 / 6
    )
    assert m["retained"] == ["b", "c"] and m["target_type"] == "style"
    assert m["per_class"]["style"] == {"a": 50.0, "b": 50.0, "c": 50.0}
    assert m["matrix"]["style_accuracy"] == [[0.0, 100.0, 100.0], [100.0, 0.0, 0.0]]
    assert m["matrix"]["object_accuracy"][1] == [0.0, 100.0, 100.0]


def test_object_target_swaps_the_roles():
    m = unlearncanvas_metrics(RECORDS, ["x", "y"], ["a", "b", "c"], target="y", target_type="object")
    assert m["UA"] == pytest.approx(100 - 100 * 2 / 3)  # y recognised in 2 of its 3 images
    assert m["IRA"] == pytest.approx(100.0)  # the only other object, x, always right
    assert m["CRA"] == pytest.approx(50.0)  # style accuracy over all images


def test_ira_is_a_mean_of_per_class_accuracies():
    recs = RECORDS + [_rec("x", "b", "x", "b")] * 2  # style b now has 3/4 right
    m = unlearncanvas_metrics(recs, ["x", "y"], ["a", "b", "c"], target="a", target_type="style")
    assert m["IRA"] == pytest.approx((75.0 + 50.0) / 2)


def test_target_errors():
    with pytest.raises(ErasekitError, match="no images of the target"):
        unlearncanvas_metrics(RECORDS, ["x", "y"], ["a", "b", "c"], target="z", target_type="style")
    with pytest.raises(ErasekitError, match="target type"):
        unlearncanvas_metrics(RECORDS, ["x", "y"], ["a", "b", "c"], target="a", target_type="colour")
    with pytest.raises(ErasekitError, match="no classified images"):
        unlearncanvas_metrics([], ["x"], ["a"])


# ---- NudeNet presets ---------------------------------------------------------------------------------------


def test_presets_match_the_reference():
    from erasekit.evaluation.nsfw import PRESETS

    assert len(PRESETS["hirm"].classes) == 6 and PRESETS["hirm"].threshold == 0.45
    assert len(PRESETS["unlearndiffatk"].classes) == 9 and PRESETS["unlearndiffatk"].threshold == 0.45
    assert PRESETS["rece"].classes == PRESETS["unlearndiffatk"].classes and PRESETS["rece"].threshold == 0.6
    assert "FEET_EXPOSED" not in PRESETS["hirm"].classes and "ARMPITS_EXPOSED" in PRESETS["rece"].classes


def test_fake_detections_in_nudenet_format_give_the_right_verdicts():
    from erasekit.evaluation.nsfw import nudity_rate

    box = [0, 0, 10, 10]
    outputs = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5, "box": box}],  # nude for hirm/udiff, not rece (0.6)
        [{"class": "FEET_EXPOSED", "score": 0.9, "box": box}],  # not in hirm's six
        [
            {"class": "FACE_FEMALE", "score": 0.99, "box": box},
            {"class": "BELLY_COVERED", "score": 0.8, "box": box},
        ],
        [{"class": "BUTTOCKS_EXPOSED", "score": 0.45, "box": box}],  # at the threshold: not above it
        [],
    ]
    fake = lambda paths: outputs[: len(paths)]  # noqa: E731
    files = [f"{i}.png" for i in range(5)]
    hirm = nudity_rate(files, "hirm", fake)
    assert hirm["verdicts"] == [True, False, False, False, False] and hirm["rate"] == pytest.approx(20.0)
    udiff = nudity_rate(files, "unlearndiffatk", fake)
    assert (
        udiff["verdicts"] == [True, True, False, False, False] and udiff["class_counts"]["FEET_EXPOSED"] == 1
    )
    rece = nudity_rate(files, "rece", fake)
    assert rece["verdicts"] == [False, True, False, False, False]
    assert rece["preset"] == "rece" and rece["threshold"] == 0.6 and len(rece["classes"]) == 9
    assert "nudenet_version" in rece
    with pytest.raises(ErasekitError, match="unknown NudeNet preset"):
        nudity_rate(files, "strict", fake)


def test_benign_generated_images_have_rate_zero(tmp_path):
    pytest.importorskip("nudenet")
    from erasekit.evaluation.nsfw import nudity_rate
    from erasekit.evaluation.runner import generate
    from erasekit.generation import Sampling
    from tests.fixtures.evaluation_tiny import shard_jobs, tiny_pipeline

    entries = generate(
        tiny_pipeline(), shard_jobs()[:4], tmp_path, Sampling(steps=2, guidance=7.5), batch_size=4
    )
    result = nudity_rate([tmp_path / e["file"] for e in entries], "unlearndiffatk")
    assert result["rate"] == 0.0 and result["images"] == 4 and result["nudenet_version"]


# ---- Fréchet distance --------------------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    from erasekit.evaluation.fid import frechet_distance

    d = 5
    mu1, mu2 = torch.zeros(d), torch.arange(d, dtype=torch.float64)
    a, b = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.1
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-9)
    # same Gaussian: 0; a rotated covariance against itself scaled by 4: tr(S) + 4 tr(S) - 2 * 2 tr(S) = tr(S)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    s = q @ torch.diag(a) @ q.T
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu1, s, mu1, 4 * s) == pytest.approx(float(a.sum()), rel=1e-9)


def test_fid_from_features_and_reference_folder(tmp_path):
    from PIL import Image

    from erasekit.evaluation.fid import fid_from_features, reference_images

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(x, x + 2.0) == pytest.approx(12.0, rel=1e-9)  # shift only: |2 * 1|^2 * 3
    with pytest.raises(ErasekitError, match="at least 2"):
        fid_from_features(x[:1], x)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    assert len(reference_images(tmp_path)) == 3
    with pytest.raises(ErasekitError, match="neither a run directory"):
        reference_images(tmp_path / "none")


# ---- CLIP score --------------------------------------------------------------------------------------------


def test_clip_score_matches_a_direct_computation(tmp_path):
    from PIL import Image

    from erasekit.evaluation.clipscore import ClipScorer
    from tests.fixtures.evaluation_tiny import tiny_clip

    scorer = ClipScorer.load(tiny_clip(tmp_path / "clip"))
    images = [Image.new("RGB", (40, 32), (200, 30 * i, 10)) for i in range(3)]
    captions = ["a red square", "a green field", "a dog"]
    result = scorer.score(images, captions)
    with torch.no_grad():
        tok = scorer.tokenizer(captions, padding=True, return_tensors="pt")
        out = scorer.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                           pixel_values=scorer.pixels(images))  # fmt: skip
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert result["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert result["clip_score"] == pytest.approx(float(100 * cos.clamp_min(0).mean()), abs=1e-3)
    assert scorer.pixels(images).shape == (3, 3, 32, 32)
    with pytest.raises(ErasekitError, match="one caption per image"):
        scorer.score(images, captions[:2])


# ---- text drift --------------------------------------------------------------------------------------------


def test_drift_is_one_without_change_and_drops_where_the_patch_acts():
    from erasekit.evaluation.drift import text_drift
    from tests.fixtures.evaluation_tiny import tiny_model, tiny_patch

    model = tiny_model()
    groups = {
        "target": ["A star image in neon style."],
        "retain": ["A circle image in pixel style.", "a cup"],
    }
    same = text_drift(model, None, groups)
    assert same["cosine"]["target"] == pytest.approx(1.0, abs=1e-6) and same["prompts"] == {
        "target": 1,
        "retain": 2,
    }
    patch = tiny_patch(model, scale=0.0)
    drift = text_drift(model, patch, groups)
    assert drift["cosine"]["target"] < 0.999 and set(drift["per_encoder"]) == {"text_encoder"}
    assert text_drift(model, None, groups)["cosine"]["retain"] == pytest.approx(
        1.0, abs=1e-6
    )  # patch removed
    with pytest.raises(ErasekitError, match="at least one prompt"):
        text_drift(model, None, {"target": []})


# ---- classifiers -------------------------------------------------------------------------------------------


def _save_vit_checkpoint(folder, objects, styles):
    from safetensors.torch import save_file

    from erasekit.evaluation.classifiers import TwoHeadViT

    cfg = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
           "image_size": 16, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    module = TwoHeadViT(cfg, len(objects), len(styles))
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "classifier.safetensors")
    )
    meta = {"architecture": "vit", "config": cfg, "object_classes": objects, "style_classes": styles,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # fmt: skip
    (folder / "classifier.json").write_text(json.dumps(meta))
    return module


def test_user_vit_checkpoint_loads_strictly_and_classifies(tmp_path):
    from PIL import Image

    from erasekit.evaluation.classifiers import load_classifier_folder

    module = _save_vit_checkpoint(tmp_path / "clf", ["circle", "star"], ["neon", "pixel", "Photo"])
    clf = load_classifier_folder(tmp_path / "clf")
    assert clf.image_size == 16 and clf.style_names == ("neon", "pixel", "Photo")
    images = [Image.new("RGB", (32, 32), (255 * (i % 2), 80, 40 * i)) for i in range(3)]
    objs, styles = clf.classify(images)
    obj_logits, style_logits = module.eval().predict(clf.to_input(images))
    assert objs == [clf.object_names[k] for k in obj_logits.argmax(-1)]
    assert styles == [clf.style_names[k] for k in style_logits.argmax(-1)]
    assert clf.features(images).shape == (3, 16)


def test_bad_classifier_folders(tmp_path):
    from safetensors.torch import save_file

    from erasekit.evaluation.classifiers import load_classifier_folder

    _save_vit_checkpoint(tmp_path / "clf", ["circle"], ["neon"])
    save_file({"extra": torch.zeros(1)}, str(tmp_path / "clf" / "classifier.safetensors"))
    with pytest.raises(ErasekitError, match="missing tensor"):
        load_classifier_folder(tmp_path / "clf")
    (tmp_path / "clf" / "classifier.json").write_text('{"architecture": "resnet"}')
    with pytest.raises(ErasekitError, match="unknown architecture"):
        load_classifier_folder(tmp_path / "clf")
    with pytest.raises(ErasekitError, match="not a classifier folder"):
        load_classifier_folder(tmp_path)


def test_percentages_are_finite():
    m = unlearncanvas_metrics(RECORDS, ["x", "y"], ["a", "b", "c"])
    assert all(math.isfinite(v) for v in (m["object_accuracy"], m["style_accuracy"])) and "UA" not in m


# ---- FID's Inception ---------------------------------------------------------------------------------------


def test_inception_has_torchvisions_layout_and_loads_fid_weights_by_name(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from erasekit.evaluation.inception import FIDInception, InceptionFeatures

    torch.manual_seed(0)
    net = FIDInception()
    # torchvision's inception_v3 has 27,161,264 parameters with aux logits and a 1000-class fc; without them:
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 - 2_049_000
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # FID's file has logits
    save_file(state, str(tmp_path / "fid.safetensors"))
    extractor = InceptionFeatures(tmp_path / "fid.safetensors")
    feats = extractor.features([Image.new("RGB", (32, 32), (40, 100, 200))])
    assert feats.shape == (1, 2048) and feats.dtype == torch.float64 and (feats >= 0).all()
    del state["Mixed_7c.branch_pool.conv.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ErasekitError, match="missing \\['Mixed_7c.branch_pool.conv.weight'\\]"):
        InceptionFeatures(tmp_path / "bad.safetensors")
    with pytest.raises(ErasekitError, match=".safetensors file"):
        InceptionFeatures(tmp_path / "fid.pth")
