"""The MiniCanvas demo: erase one concept, evaluate the grid before and after, and write an HTML report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.io import check_output_dir

METRICS = ("UA", "IRA", "CRA", "object_accuracy", "style_accuracy")


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced: the patch, the two runs, the report and the metrics of each run."""

    out: Path
    concept: str
    method: str
    erase_seconds: float
    base: dict[str, Any]
    erased: dict[str, Any]
    seconds: float

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    def summary(self) -> str:
        rows = [f"{'metric':<16}{'base':>8}{'erased':>8}"]
        for key in METRICS:
            rows.append(
                f"{key:<16}{self.base.get(key, float('nan')):>8.1f}{self.erased.get(key, float('nan')):>8.1f}"
            )
        gen = self.erased.get("generality", {}).get("UA_synonyms")
        if gen is not None:
            base_gen = self.base.get("generality", {}).get("UA_synonyms", float("nan"))
            rows.append(f"{'UA (synonyms)':<16}{base_gen:>8.1f}{gen:>8.1f}")
        head = (
            f"erased {self.concept!r} with {self.method} in {self.erase_seconds:.1f} s "
            f"(demo took {self.seconds:.0f} s)"
        )
        return "\n".join([head, *rows, f"report: {self.report}"])


def run(
    *,
    model: str = "minicanvas",
    concept: str = "sketch",
    method: str = "hirm-r",
    preset: str | None = None,
    seeds: int = 1,
    steps: int | None = None,
    batch_size: int = 16,
    out: str | Path = "erasekit-demo",
    overwrite: bool = False,
) -> DemoResult:
    """Erase ``concept`` from a MiniCanvas model with ``method`` and evaluate the full grid before and after.

    Writes ``out/patch`` (the patch), ``out/base`` and ``out/erased`` (evaluation runs with images) and
    ``out/report.html``.
    """
    from erasekit.evaluation.protocols import evaluate
    from erasekit.evaluation.report import write_report
    from erasekit.generation import Sampling
    from erasekit.minicanvas import concept_kind
    from erasekit.models.loading import load
    from erasekit.registry import erase

    start = time.perf_counter()
    out = check_output_dir(out, overwrite)
    kind = concept_kind(concept)
    loaded = load(model)
    if loaded.pipeline is None:
        raise ErasekitError(f"the demo needs a full MiniCanvas pipeline; {model} has only text encoders")
    patch = erase(loaded, [concept], method, preset, concept_type=kind)
    patch.save(out / "patch", overwrite=overwrite)
    common = {
        "target": concept,
        "seeds": seeds,
        "sampling": Sampling.for_model(loaded, steps=steps),
        "batch_size": batch_size,
        "overwrite": overwrite,
    }
    base = evaluate(loaded, "minicanvas", out / "base", **common)
    erased = evaluate(loaded, "minicanvas", out / "erased", patches=[patch], **common)
    write_report(
        [out / "base", out / "erased"],
        out / "report.html",
        title=f"erasekit demo: erasing {concept!r} with {method}",
        overwrite=overwrite,
    )
    return DemoResult(
        out, concept, method, patch.erase_seconds or 0.0, base, erased, time.perf_counter() - start
    )
