"""The generation runner: determinism across batch sizes, resuming, atomic outputs, sharding over 2 processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.evaluation.runner import Job, generate, grid, read_manifest
from erasekit.generation import Sampling
from tests.fixtures.evaluation_tiny import (
    assert_images_close,
    generate_shard_grid,
    one_thread,  # noqa: F401  (autouse: tiny models on one thread)
    pixels,
    shard_jobs,
    tiny_pipeline,
)

SAMPLING = Sampling(steps=2, guidance=3.0)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_grid_is_prompt_major_with_unique_keys():
    jobs = grid([("a", "x", {}), ("b", "y", {"k": 1})], [1, 2])
    assert [(j.key, j.prompt, j.seed) for j in jobs] == [("a_s1", "x", 1), ("a_s2", "x", 2), ("b_s1", "y", 1),
                                                         ("b_s2", "y", 2)]  # fmt: skip
    assert jobs[2].meta == {"k": 1}


def test_batch_size_moves_no_pixel_by_more_than_one_level(pipe, tmp_path):
    # The documented guarantee (erasekit.generation): batched kernels may round differently, never more.
    jobs = shard_jobs()
    for bs in (1, 4, 9):
        generate(pipe, jobs, tmp_path / f"b{bs}", SAMPLING, batch_size=bs)
    one = pixels(tmp_path / "b1")
    assert len(one) == 9
    assert_images_close(pixels(tmp_path / "b4"), one)
    assert_images_close(pixels(tmp_path / "b9"), one)
    # different seeds do give different images
    assert abs(one["a_s3.png"].astype(int) - one["a_s5.png"].astype(int)).max() > 8


def test_manifest_records_every_image_in_job_order(pipe, tmp_path):
    jobs = [Job("x", "a star", 1, None, {"m": 1}), Job("y", "a star", 2, 5.0)]
    entries = generate(pipe, jobs, tmp_path, SAMPLING, batch_size=8)
    assert [e["key"] for e in entries] == ["x", "y"]
    assert entries[0]["guidance"] == 3.0 and entries[1]["guidance"] == 5.0  # per-job guidance wins
    assert entries[0]["meta"] == {"m": 1} and entries[0]["file"] == "images/x.png"
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["x", "y"]
    assert not list(tmp_path.glob("manifest.part-*")) and not list(tmp_path.rglob("*.tmp"))


def test_restart_skips_finished_images_and_redoes_missing_ones(pipe, tmp_path, monkeypatch):
    jobs = shard_jobs()
    generate(pipe, jobs[:4], tmp_path, SAMPLING, batch_size=2)
    first = pixels(tmp_path)
    (tmp_path / "images" / "a_s5.png").unlink()  # listed in the manifest but lost: must be regenerated
    calls = []
    real_call = pipe.__class__.__call__
    monkeypatch.setattr(
        pipe.__class__, "__call__", lambda self, **kw: calls.append(kw["prompt"]) or real_call(self, **kw)
    )
    entries = generate(pipe, jobs, tmp_path, SAMPLING, batch_size=16)
    assert sum(len(c) for c in calls) == 9 - 3  # 3 of the first 4 were done
    assert len(entries) == 9
    assert_images_close({"a_s5": pixels(tmp_path)["a_s5.png"]}, {"a_s5": first["a_s5.png"]})


def test_a_line_cut_short_by_a_crash_is_ignored(pipe, tmp_path):
    jobs = shard_jobs()[:2]
    generate(pipe, jobs, tmp_path, SAMPLING)
    with open(tmp_path / "manifest.part-0.jsonl", "w") as f:
        f.write('{"key": "a_s5", "fi')
    assert [e["key"] for e in read_manifest(tmp_path)] == ["a_s3", "a_s5"]
    (tmp_path / "manifest.jsonl").write_text("not json\n" + (tmp_path / "manifest.jsonl").read_text())
    with pytest.raises(ErasekitError, match="manifest.jsonl:1: not a JSON line"):
        read_manifest(tmp_path)


def test_bad_arguments(pipe, tmp_path):
    with pytest.raises(ErasekitError, match="duplicate keys"):
        generate(pipe, [Job("k", "a", 1), Job("k", "b", 2)], tmp_path, SAMPLING)
    with pytest.raises(ErasekitError, match="batch size"):
        generate(pipe, shard_jobs(), tmp_path, SAMPLING, batch_size=0)
    with pytest.raises(ErasekitError, match="steps"):
        Sampling(steps=0, guidance=7.5)


def test_scheduler_swap_is_recorded_and_undone(pipe, tmp_path):
    from erasekit.generation import scheduler_info

    before = type(pipe.scheduler)
    assert scheduler_info(pipe, "EulerDiscreteScheduler")["class"] == "EulerDiscreteScheduler"
    generate(
        pipe, shard_jobs()[:1], tmp_path, Sampling(steps=2, guidance=7.5, scheduler="EulerDiscreteScheduler")
    )
    assert type(pipe.scheduler) is before
    with pytest.raises(ErasekitError, match="no scheduler class"):
        generate(
            pipe,
            shard_jobs()[:1],
            tmp_path / "x",
            Sampling(steps=2, guidance=7.5, scheduler="NoSuchScheduler"),
        )


def test_two_gloo_processes_merge_into_the_single_process_output(tmp_path):
    script = Path(__file__).parent / "fixtures" / "evaluation_tiny.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "two")]  # fmt: skip
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    generate_shard_grid(str(tmp_path / "one"))
    assert (tmp_path / "two" / "manifest.jsonl").read_text() == (
        tmp_path / "one" / "manifest.jsonl"
    ).read_text()
    assert_images_close(pixels(tmp_path / "two"), pixels(tmp_path / "one"))
    assert not list((tmp_path / "two").glob("manifest.part-*"))


def test_the_safety_checker_is_off_while_generating_and_restored(pipe, tmp_path):
    class Checker(torch.nn.Module):  # would black out every image if it were called
        def forward(self, *args, **kwargs):
            raise AssertionError("the safety checker ran")

    checker = Checker()
    pipe.safety_checker = checker
    try:
        generate(pipe, shard_jobs()[:1], tmp_path, SAMPLING)
        assert pipe.safety_checker is checker
    finally:
        pipe.safety_checker = None
