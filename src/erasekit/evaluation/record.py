"""Run directories and run records: every number says how it was obtained.

A run directory ``RUN/`` holds::

    RUN/run_config.json    what is being run (written first; a restart must ask for the same run)
    RUN/manifest.jsonl     one line per generated image (see :mod:`erasekit.evaluation.runner`)
    RUN/images/*.png       the generated images
    RUN/metrics.json       the metrics (written last: a run without it is unfinished and resumable)
    RUN/record.json        config, protocol, model and patch fingerprints, sampling, versions, commit,
                           hardware, timings, and the metrics again
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from erasekit.errors import ErasekitError
from erasekit.io import atomic_write_json

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
RECORD = "record.json"
_RUN_FILES = (RUN_CONFIG, METRICS, RECORD, "manifest.jsonl", "images")


def check_run(out: str | Path, config: dict[str, Any], overwrite: bool = False) -> None:
    """Raise unless ``out`` may hold the run ``config``: absent or empty, an unfinished run of the same config,
    or (with ``overwrite``) a finished erasekit run. Reads only, so every rank of a sharded run can call it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"output {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / RUN_CONFIG).is_file():
        raise ErasekitError(f"output {out} is a non-empty directory that is not an erasekit run")
    if overwrite:
        return
    if (out / METRICS).is_file():
        raise ErasekitError(f"output {out} holds a finished run; pass --overwrite to replace it")
    if _read(out / RUN_CONFIG) != _normal(config):
        raise ErasekitError(f"output {out} holds an unfinished run of a different config; use another --out")


def prepare_run(out: str | Path, config: dict[str, Any], overwrite: bool = False) -> Path:
    """Create or resume the run directory ``out`` for ``config`` (see :func:`check_run`).

    With ``overwrite``, an existing run's files are deleted first (nothing else in the folder is touched).
    """
    check_run(out, config, overwrite)
    out = Path(out)
    if overwrite and (out / RUN_CONFIG).is_file():
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_CONFIG, config)
    return out


def _clear(out: Path) -> None:
    for name in _RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for part in out.glob("manifest.part-*.jsonl"):
        part.unlink()


def _read(file: Path) -> Any:
    return json.loads(file.read_text("utf-8"))


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def model_fingerprint(components: dict[str, Any]) -> str:
    """SHA-256 over every tensor of every torch component (names, shapes, dtypes and bytes), in name order."""
    h = hashlib.sha256()
    for comp in sorted(components):
        module = components[comp]
        if not isinstance(module, torch.nn.Module):
            continue
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{comp}/{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def build_record(
    *,
    protocol: str,
    config: dict[str, Any],
    model: LoadedModel,
    model_sha256: str,
    patches: Sequence[Any],
    sampling: dict[str, Any],
    timings: dict[str, float],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The run record (see the module docstring).

    Args:
        protocol: the protocol name.
        config: the run's config (``run_config.json``).
        model: the :class:`~erasekit.models.loading.LoadedModel` evaluated.
        model_sha256: :func:`model_fingerprint` of the base model, before patches.
        patches: the applied :class:`~erasekit.patch.Patch` objects, in order.
        sampling: seeds, steps, guidance, scheduler class and config.
        timings: wall seconds of each phase.
        metrics: the metrics.
    """
    from erasekit.provenance import hardware, package_versions, provenance

    return {
        "protocol": protocol,
        "config": config,
        "model": {"source": model.source, "family": model.family.name, "sha256": model_sha256},
        "patches": [{**p.summary(), "sha256": p.fingerprint(), "config": p.config} for p in patches],
        "sampling": sampling,
        "versions": package_versions(),
        "provenance": provenance(),
        "hardware": hardware(),
        "timings": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics": metrics,
    }


def finish_run(out: str | Path, metrics: dict[str, Any], record: dict[str, Any]) -> None:
    """Write ``record.json``, then ``metrics.json`` (whose presence marks the run finished)."""
    out = Path(out)
    atomic_write_json(out / RECORD, record)
    atomic_write_json(out / METRICS, metrics)


def read_run(run: str | Path) -> dict[str, Any]:
    """``{"path", "metrics", "record", "manifest"}`` of a finished run directory."""
    from erasekit.evaluation.runner import read_manifest

    run = Path(run)
    if not (run / METRICS).is_file():
        raise ErasekitError(f"{run} is not a finished erasekit run (no {METRICS})")
    record = _read(run / RECORD) if (run / RECORD).is_file() else {}
    return {"path": run, "metrics": _read(run / METRICS), "record": record, "manifest": read_manifest(run)}
