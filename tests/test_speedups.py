"""The generation path's runtime speed-ups: the images stay those of the plain pipeline call, up to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasekit.evaluation.runner import generate, grid
from erasekit.generation import (
    FAST,
    PLAIN,
    Request,
    Sampling,
    Speedups,
    _run_length,
    render,
    text_kv_cache,
    to_uint8,
)
from tests.fixtures.evaluation_tiny import (
    assert_images_close,
    one_thread,  # noqa: F401  (autouse: tiny models on one thread)
    pixels,
    tiny_pipeline,
)

SAMPLING = Sampling(steps=3, guidance=4.0)
# prompt x seeds, prompt-major, as every protocol lays out its grid
GRID = [
    Request(seed=s, prompt=p)
    for p in ("a circle image in neon style", "a star", "neon mosaic")
    for s in (3, 5)
]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _uint8(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {str(i): to_uint8(img) for i, img in enumerate(images)}


@pytest.mark.parametrize(
    ("speedups", "batch_size"),
    [(FAST, 6), (FAST, 4), (Speedups(shared_prompts=False), 6), (Speedups(text_kv_cache=False), 6)],
)
def test_speedups_keep_images_within_one_level_of_the_plain_call(pipe, speedups, batch_size):
    plain = render(pipe, GRID, SAMPLING, batch_size=batch_size, desc=None, speedups=PLAIN)
    fast = render(pipe, GRID, SAMPLING, batch_size=batch_size, desc=None, speedups=speedups)
    assert_images_close(_uint8(plain), _uint8(fast))


def test_the_runner_generates_the_plain_images_with_speedups(pipe, tmp_path):
    jobs = grid([("a", "a circle image in neon style", {}), ("b", "a star", {})], [3, 5, 7])
    generate(pipe, jobs, tmp_path / "plain", SAMPLING, batch_size=6, speedups=PLAIN)
    generate(pipe, jobs, tmp_path / "fast", SAMPLING, batch_size=6)
    assert_images_close(pixels(tmp_path / "plain"), pixels(tmp_path / "fast"))


def test_shared_prompts_encode_each_prompt_once_through_the_pipeline(pipe, monkeypatch):
    seen = []
    real = type(pipe).__call__

    def spy(self, **kwargs):
        seen.append(kwargs)
        return real(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    render(pipe, GRID, SAMPLING, batch_size=4, desc=None)
    # batch 1: [p1, p1, p2, p2] -> 2 prompts x 2 images; batch 2: [p3, p3]
    assert [k["prompt"] for k in seen] == [[GRID[0].prompt, GRID[2].prompt], [GRID[4].prompt]]
    assert [k["num_images_per_prompt"] for k in seen] == [2, 2]
    assert [len(k["generator"]) for k in seen] == [4, 2]  # still one generator per image


@pytest.mark.parametrize(
    ("prompts", "run"),
    [(["a", "a", "b", "b"], 2), (["a"] * 4, 4), (["a", "b"], 1), (["a", "a", "b"], 1), (["a", "b", "a", "b"], 1),
     (["a", "a", "b", "b", "b", "b"], 2), ([], 1)],
)  # fmt: skip
def test_run_length(prompts, run):
    assert _run_length(prompts) == run


def test_text_kv_cache_reuses_a_projection_only_for_the_same_input_and_weights(pipe):
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    original = attn.to_k
    names = [n for n, _ in pipe.unet.named_parameters()]
    text = torch.randn(2, 77, 16)
    with torch.no_grad(), text_kv_cache(pipe):
        memo = attn.to_k
        assert memo is not original
        assert [n for n, _ in pipe.unet.named_parameters()] == names  # the same parameters, the same names
        first = memo(text)
        assert memo(text) is first  # the next denoising step: not computed again
        assert memo(text.clone()) is not first  # another tensor: computed
        assert torch.equal(memo(text), first)
        original.weight.mul_(2.0)  # a patch applied in place
        assert torch.allclose(memo(text), torch.nn.functional.linear(text, original.weight, original.bias))
        original.weight.div_(2.0)
    assert attn.to_k is original


def test_text_kv_cache_follows_weights_changed_between_renders(pipe):
    weight = pipe.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.weight
    before = render(pipe, GRID[:2], SAMPLING, batch_size=2, desc=None)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(3.0)
    try:
        plain = render(pipe, GRID[:2], SAMPLING, batch_size=2, desc=None, speedups=PLAIN)
        fast = render(pipe, GRID[:2], SAMPLING, batch_size=2, desc=None)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert_images_close(_uint8(plain), _uint8(fast))
    assert not np.array_equal(to_uint8(before[0]), to_uint8(fast[0]))  # the change did reach the images


def test_text_kv_cache_leaves_hooked_projections_and_restores_after_an_error(pipe):
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    hooked, other = attn.to_k, attn.to_v
    handle = hooked.register_forward_hook(lambda *args: None)
    try:
        with pytest.raises(RuntimeError), text_kv_cache(pipe):
            assert attn.to_k is hooked  # a hook must see every call: left alone
            assert attn.to_v is not other
            raise RuntimeError("boom")
    finally:
        handle.remove()
    assert attn.to_v is other
    other.forward = other.forward  # as accelerate's offloading hooks wrap it
    try:
        with text_kv_cache(pipe):
            assert attn.to_v is other
    finally:
        del other.forward
    self_attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    with text_kv_cache(pipe):
        assert type(self_attn.to_k) is torch.nn.Linear  # self-attention's input changes every step
