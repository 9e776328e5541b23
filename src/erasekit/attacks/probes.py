"""Cheap probes every attack table should have: synonyms and paraphrases, random tokens, and many seeds.

- ``synonyms``: the base prompts with the concept's other names (the MiniCanvas world's synonyms, a built-in
  list for nudity, or the budget's ``names``), plus the world's paraphrase templates.
- ``random-probe``: random vocabulary tokens before or after each base prompt (Lu et al., NeurIPS 2025, as
  raised in HiRM's reviews), drawn from a seeded generator.
- ``seed-search``: each base prompt with many seeds; a prompt falls when any seed shows the concept (``ASR``),
  and the share of images that show it is reported beside it (``ASR_images``).

None of these has a published budget: the ``paper`` presets are ours. They are not matched in cost to the
optimising attacks. Per base prompt and ``--seeds S``: ``synonyms`` generates (synonyms + paraphrases) x S
images, ``random-probe`` 8 x S, and ``seed-search`` 32 images whatever S is (the seeds are its search space),
scored with the any-image rule. Ring-A-Bell, textual inversion and encoder swap generate S per prompt,
UnlearnDiffAtk 2 x S (before and after). So a seed-search ASR is an upper bound at many more samples, not a
rate comparable with the others'; compare methods within one column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erasekit.attacks import register_attack
from erasekit.attacks.base import AttackResult, AttackTarget, Budget, Candidate, ordinary_tokens
from erasekit.attacks.concepts import fill
from erasekit.errors import ErasekitError

POSITIONS = ("prefix", "suffix", "both")


@dataclass(frozen=True, kw_only=True)
class SynonymsConfig(Budget):
    """Which other names and wordings to try."""

    names: tuple[str, ...] = field(
        default=(), metadata={"help": "other names to try (default: the concept's synonyms), comma-separated"}
    )
    paraphrases: bool = field(default=True, metadata={"help": "also try the world's paraphrase templates"})


def synonyms(target: AttackTarget, config: SynonymsConfig) -> AttackResult:
    """Synonyms and paraphrases: the concept under its other names and other wordings."""
    ps = target.prompts
    names = [n.strip() for n in config.names if n.strip()] or list(ps.synonyms)
    paraphrases = ps.paraphrases if config.paraphrases else ()
    if not names and not any(paraphrases):
        raise ErasekitError(f"no synonyms known for {ps.concept!r}; pass --budget names=a,b,c")
    cands = [
        Candidate(prompt=fill(hole, n), group=i) for n in names for i, hole in enumerate(ps.placeholders)
    ]
    cands += [Candidate(prompt=p, group=i) for i, group in enumerate(paraphrases) for p in group]
    return AttackResult(candidates=tuple(cands), patch=target.patch, stats={"names": names})


@dataclass(frozen=True, kw_only=True)
class RandomProbeConfig(Budget):
    """How many random-token probes per base prompt, and how long."""

    probes: int = field(default=8, metadata={"help": "random probes per base prompt"})
    tokens: int = field(default=5, metadata={"help": "random tokens per probe"})
    position: str = field(
        default="both", metadata={"help": "prefix, suffix, or both (alternating between probes)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probes < 1 or self.tokens < 1:
            raise ValueError("probes and tokens must be >= 1")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")


def random_probe(target: AttackTarget, config: RandomProbeConfig) -> AttackResult:
    """Random probe: random vocabulary tokens before or after each base prompt."""
    _, _, tokenizer = target.model.clip_encoders()[0]
    vocab = ordinary_tokens(tokenizer)
    g = torch.Generator().manual_seed(config.seed)
    cands = []
    for i, prompt in enumerate(target.prompts.positives):
        picks = vocab[
            torch.randint(0, len(vocab), (config.probes, config.tokens), generator=g)
        ]  # [probes, T]
        for j, ids in enumerate(picks):
            noise = tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
            prefix = config.position == "prefix" or (config.position == "both" and j % 2 == 0)
            cands.append(Candidate(prompt=f"{noise} {prompt}" if prefix else f"{prompt} {noise}", group=i))
    return AttackResult(candidates=tuple(cands), patch=target.patch)


@dataclass(frozen=True, kw_only=True)
class SeedSearchConfig(Budget):
    """How many seeds each base prompt is tried with."""

    search_seeds: int = field(default=32, metadata={"help": "seeds tried per base prompt"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.search_seeds < 1:
            raise ValueError("search_seeds must be >= 1")


def seed_search(target: AttackTarget, config: SeedSearchConfig) -> AttackResult:
    """Seed search: each base prompt with many seeds; it falls when any seed shows the concept."""
    g = torch.Generator().manual_seed(config.seed)
    seeds = tuple(int(s) for s in torch.randperm(2**20, generator=g)[: config.search_seeds])
    cands = tuple(Candidate(prompt=p, group=i, seeds=seeds) for i, p in enumerate(target.prompts.positives))
    return AttackResult(candidates=cands, patch=target.patch, stats={"seeds": list(seeds)})


register_attack("synonyms", SynonymsConfig, presets={"paper": {}}, summary=synonyms.__doc__.split("\n")[0])(
    synonyms
)
register_attack(
    "random-probe", RandomProbeConfig, presets={"paper": {}}, summary=random_probe.__doc__.split("\n")[0]
)(random_probe)
register_attack(
    "seed-search",
    SeedSearchConfig,
    presets={"paper": {}},
    asr="any",
    summary=seed_search.__doc__.split("\n")[0],
)(seed_search)
