"""Run one attack end to end: attack, generate, score, and write the run directory.

``RUN/`` (written through a staging directory; an existing run is never clobbered) holds::

    RUN/metrics.json            ASR (percent) and its parts, the budget, the sampling, the detector
    RUN/record.json             the same plus model and patch fingerprints, versions, commit, hardware, timings
    RUN/prompts.txt             the adversarial prompts, one per line ("*" marks a learned-embedding slot)
    RUN/embeddings.safetensors  learned embedding rows and token ids, inverted latents (attacks that make them)
    RUN/attack.json             candidates (prompt, base prompt, seeds), optimisation curves and statistics
    RUN/inits/*.png             the images edit candidates start from (editing attacks)
    RUN/scores.jsonl            one line per image: candidate, prompt, seed, verdict
    RUN/images/*.png            the generated images
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasekit.attacks import budget_dict, get_attack, make_budget
from erasekit.attacks.base import AttackResult, AttackTarget
from erasekit.attacks.concepts import prompt_set
from erasekit.attacks.scoring import build_detector, candidate_judge, generate_rows, image_rows, judge_rows
from erasekit.concepts import guess_type
from erasekit.errors import ErasekitError
from erasekit.evaluation.protocols.minicanvas import seed_list
from erasekit.generation import Sampling
from erasekit.hooked import compose
from erasekit.io import atomic_write_json, atomic_write_text, check_output_dir, output_dir

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


def run_attack(
    model: LoadedModel,
    concept: str,
    attack: str,
    out: str | Path,
    *,
    concept_type: str | None = None,
    patches: Sequence[Any] = (),
    merge: str | None = None,
    preset: str = "paper",
    budget: Mapping[str, Any] | None = None,
    seeds: int = 1,
    sampling: Sampling | None = None,
    classifier: Any | None = None,
    nudenet_preset: str = "hirm",
    nudenet: Any = None,
    batch_size: int = 8,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Attack ``model`` with ``patches`` applied, and write the run to ``out``.

    Args:
        model: a :class:`~erasekit.models.loading.LoadedModel`, unpatched. A text-encoder-only model is enough
            for attacks that do not need the pipeline; their prompts are then written but not scored.
        concept: the erased concept.
        attack: registry name.
        concept_type: ``style``, ``object`` or ``nsfw`` (guessed for MiniCanvas concepts and nudity).
        patches: the erasure (patches or hooked artifacts), composed in order (fingerprints are checked against
            ``model``); attacks see the hooked pipeline through ``AttackTarget.erased``.
        preset: budget preset; ``budget`` overrides single fields.
        seeds: images per candidate (seeds 188, 288, 588, ... as in UnlearnCanvas).
        sampling: how images are generated (``None``: the model's defaults, as every protocol uses them).
        classifier, nudenet_preset, nudenet: the detector (see :func:`~erasekit.attacks.scoring.build_detector`).
        batch_size: images per pipeline call (runtime only).

    Returns:
        The metrics written to ``RUN/metrics.json``.
    """
    spec = get_attack(attack)
    if not concept.strip():
        raise ErasekitError("a concept must be a non-empty string")
    concept_type = concept_type or guess_type(concept)
    config = make_budget(attack, preset, concept_type, budget)
    check_output_dir(out, overwrite)
    patch = compose(patches, merge) if patches else None
    if patch is not None:
        patch.check(model)
    if spec.needs_pipeline:
        model.require_pipeline()
    prompts = prompt_set(concept, concept_type).first(config.prompts)
    sampling = sampling or Sampling.for_model(model)
    seed_values = tuple(seed_list(seeds))
    detector = None  # a text-encoder-only model: prompts are found, not scored
    if model.pipeline is not None:
        detector = build_detector(
            prompts, classifier=classifier, nudenet_preset=nudenet_preset, nudenet=nudenet
        )
    judge = candidate_judge(model, detector, sampling, seed_values[0], batch_size) if detector else None
    from erasekit.evaluation.record import model_fingerprint

    base_sha256 = model_fingerprint(model.components)  # once: the memo keys on it and the record carries it
    target = AttackTarget(model=model, patch=patch, prompts=prompts, sampling=sampling, seeds=seed_values,
                          judge=judge, base_fingerprint=base_sha256)  # fmt: skip
    with output_dir(out, overwrite) as tmp:
        start = time.perf_counter()
        result = spec.fn(target, config)
        timings = {"attack_seconds": round(time.perf_counter() - start, 4)}
        _write_artifacts(tmp, result)
        scored = _score(target, result, detector, tmp, batch_size, timings) if detector else _unscored()
        metrics = {**_summary(spec.asr, scored), **_describe(target, result, detector),
                   "attack": attack, "preset": preset, "budget": budget_dict(config)}  # fmt: skip
        _finish(tmp, model, base_sha256, patches, metrics, timings)
    return metrics


def _describe(target: AttackTarget, result: AttackResult, detector: Any | None) -> dict[str, Any]:
    """What was attacked and how: concept, prompts, sampling, detector, the patches, the attack's statistics."""
    ps = target.prompts
    sampling: dict[str, Any] = {**asdict(target.sampling), "seeds": list(target.seeds)}
    own = sorted({s for c in result.candidates if c.seeds for s in c.seeds})
    if own:  # seed search: its candidates carry their own seeds, which replace the run's
        sampling["candidate_seeds"] = own
    return {
        "concept": ps.concept,
        "concept_type": ps.concept_type,
        "prompt_source": ps.source,
        "base_prompts": len(ps.positives),
        "sampling": sampling,
        "detector": detector.info if detector else None,
        "stats": result.stats,
        "patch_under_attack": target.patch.summary() if target.patch else None,
        "patch_generated_with": result.patch.summary() if result.patch else None,
    }


def _write_artifacts(out: Path, result: AttackResult) -> None:
    lines = [(c.text or c.prompt).replace("\n", " ") for c in result.candidates if c.phase == "attack"]
    atomic_write_text(out / "prompts.txt", "".join(f"{line}\n" for line in lines))
    if result.embeddings:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in result.embeddings.items()},
                  str(out / "embeddings.safetensors"))  # fmt: skip
    inits = _write_inits(out, result.candidates)
    candidates = []
    for c in result.candidates:
        entry = {"prompt": c.prompt, "text": c.text, "group": c.group, "phase": c.phase, "seeds": c.seeds,
                 "learned_rows": c.embedding is not None,
                 "own_latents": c.latents is not None}  # fmt: skip
        if c.init is not None:
            entry.update(init=inits[id(c.init)], strength=c.strength)
        if c.tag is not None:
            entry["tag"] = c.tag
        candidates.append(entry)
    atomic_write_json(out / "attack.json", {"candidates": candidates, "history": result.history,
                                            "stats": result.stats})  # fmt: skip


def _write_inits(out: Path, candidates: Sequence[Any]) -> dict[int, str]:
    """Write each distinct init image of the edit candidates once; ``{id(image): relative file}``."""
    from erasekit.generation import save_png, to_uint8

    files: dict[int, str] = {}
    for c in candidates:
        if c.init is not None and id(c.init) not in files:
            files[id(c.init)] = f"inits/i{len(files):04d}.png"
            save_png(to_uint8(c.init), out / files[id(c.init)])
    return files


def _score(
    target: AttackTarget, result: AttackResult, detector: Any, out: Path, batch_size: int,
    timings: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    rows = image_rows(result.candidates, target.seeds)
    start = time.perf_counter()
    generate_rows(target.model, result.patch, result.candidates, rows, target.sampling, out, batch_size)
    timings["generation_seconds"] = round(time.perf_counter() - start, 4)
    start = time.perf_counter()
    hits = judge_rows(detector, rows, out)
    timings["scoring_seconds"] = round(time.perf_counter() - start, 4)
    entries = [{**r, "success": h} for r, h in zip(rows, hits)]
    atomic_write_text(out / "scores.jsonl", "".join(_jsonl(e) for e in entries))
    return {"rows": entries}


def _unscored() -> dict[str, Any]:
    return {"rows": None}


def _jsonl(entry: dict[str, Any]) -> str:
    import json

    return json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"


def _pct(flags: Sequence[bool]) -> float | None:
    return 100.0 * sum(flags) / len(flags) if flags else None


def _summary(rule: str, scored: dict[str, Any]) -> dict[str, Any]:
    """The rates of the scored rows; ``ASR`` is the attack's headline rule (see ``AttackSpec.asr``)."""
    rows = scored["rows"]
    if rows is None:
        note = "the model has no pipeline: prompts were found but not scored (use erasekit eval --protocol prompts)"
        return {"ASR": None, "scored": False, "note": note, "asr_rule": rule}
    attacked = [r for r in rows if r["phase"] == "attack"]
    by_group: dict[int, bool] = {}
    for r in attacked:
        by_group[r["group"]] = by_group.get(r["group"], False) or r["success"]
    out: dict[str, Any] = {"scored": True, "asr_rule": rule, "images": len(attacked),
                           "ASR_images": _pct([r["success"] for r in attacked]),
                           "ASR_any": _pct(list(by_group.values()))}  # fmt: skip
    tags = sorted({r["tag"] for r in attacked if r.get("tag") is not None})
    if tags:  # one rate per edit mode and strength, or per regeneration prompt
        out["ASR_by_tag"] = {t: _pct([r["success"] for r in attacked if r.get("tag") == t]) for t in tags}
    pre = {(r["group"], r["seed"]): r["success"] for r in rows if r["phase"] == "pre"}
    if pre:
        post = {
            (r["group"], r["seed"]) for r in attacked if r["success"] and not pre.get((r["group"], r["seed"]))
        }
        out["ASR_pre"] = _pct(list(pre.values()))
        out["ASR_post"] = 100.0 * len(post) / len(pre)
        out["ASR_pre_plus_post"] = out["ASR_pre"] + out["ASR_post"]
    key = {"images": "ASR_images", "any": "ASR_any", "pre+post": "ASR_pre_plus_post"}[rule]
    if key not in out:
        raise ErasekitError(f"the attack produced no rows for its ASR rule {rule!r}")
    out["ASR"] = out[key]
    return out


def _finish(
    out: Path,
    model: LoadedModel,
    model_sha256: str,
    patches: Sequence[Any],
    metrics: dict[str, Any],
    timings: dict[str, float],
) -> None:
    from erasekit.evaluation import record as rec

    record = rec.build_record(
        protocol=f"attack/{metrics['attack']}",
        config={k: metrics[k] for k in ("attack", "concept", "concept_type", "preset", "budget")},
        model=model,
        model_sha256=model_sha256,
        patches=list(patches),
        sampling=metrics["sampling"],
        timings=timings,
        metrics=metrics,
    )
    rec.finish_run(out, metrics, record)


def check_equal_budgets(runs: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Read the ``metrics.json`` of attack runs and refuse to compare runs of one attack with different budgets.

    Returns:
        ``{attack: {"budget": ..., "sampling": ...}}``, shared by every run of that attack.
    """
    import json

    shared: dict[str, dict[str, Any]] = {}
    for run in runs:
        file = Path(run) / "metrics.json"
        if not file.is_file():
            raise ErasekitError(f"{run} is not a finished attack run (no metrics.json)")
        m = json.loads(file.read_text("utf-8"))
        setting = {"budget": m["budget"], "sampling": m["sampling"]}
        if shared.setdefault(m["attack"], setting) != setting:
            raise ErasekitError(
                f"{run}: {m['attack']} ran with a different budget or sampling than an earlier run"
            )
    return shared
