"""Ring-A-Bell (Tsai et al., ICLR 2024): a genetic search for discrete prompts near "prompt + η · concept".

The ``paper`` preset follows the authors' release, chiayi-hsu/Ring-A-Bell at commit e4585ada
(``InversePrompt.ipynb`` for the search, ``Get_Concept_Vector.ipynb`` for the vector). Text encoder only,
black-box to the UNet, so it runs on a text-encoder-only folder:

- concept vector v = mean_i [E(c_i⁺) − E(c_i⁻)] over a fixed set of prompt pairs with and without the concept
  (:func:`erasekit.attacks.concepts.concept_pairs`, never the attacked prompts), E the encoder's last hidden
  state flattened over the 77 positions (summed over every CLIP encoder of the family);
- for each base prompt p, target = E(p) + η v;
- the released genetic algorithm over K token ids minimises ‖target − E([BOS, tokens, EOS, pad…])‖²: each
  generation keeps the best half of the population as parents; each parent is kept and, with probability
  ``crossover``, crosses with a random parent at one random cut, giving two children; every individual, parents
  included, then gets one random token with probability ``mutation``. There is no elite, so the best fitness can
  get worse from one generation to the next; the result is the best of the last generation.

The found ids are decoded into ordinary prompts (they transfer to any model with that encoder); the ids
themselves are saved too, since decoding and re-tokenising is not always the identity.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from erasekit.attacks import register_attack
from erasekit.attacks.base import AttackResult, AttackTarget, Budget, Candidate, ordinary_tokens
from erasekit.attacks.concepts import concept_pairs
from erasekit.progress import track

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel

ENCODERS = ("base", "erased")
FITNESS_BATCH = 256  # sequences per encoder call (runtime only)


@dataclass(frozen=True, kw_only=True)
class RingABellConfig(Budget):
    """Ring-A-Bell's budget; ``paper`` is chiayi-hsu/Ring-A-Bell's ``InversePrompt.ipynb`` at e4585ada: population
    200 (the best 100 kept), 3000 generations, mutation 0.25, crossover 0.5, K = 16. The concept vector's pairs
    are our own per-concept set (MiniCanvas: the world's paraphrase templates and synonyms), as the release has
    pairs only for nudity and violence; see :func:`~erasekit.attacks.concepts.concept_pairs`."""

    tokens: int = field(
        default=16, metadata={"help": "K, prompt length in tokens (16 or 77; 77 fills all 75 slots)"}
    )
    eta: float = field(default=3.0, metadata={"help": "η, strength of the concept vector in the target"})
    population: int = field(default=200, metadata={"help": "individuals per generation"})
    generations: int = field(default=3000, metadata={"help": "generations of the genetic search"})
    mutation: float = field(
        default=0.25,
        metadata={"help": "probability that an individual (parent or child) gets one random token"},
    )
    crossover: float = field(
        default=0.5,
        metadata={"help": "probability that a parent crosses with a random parent (two children)"},
    )
    encoder: str = field(
        default="base",
        metadata={"help": "encoder the search queries: base (the authors') or erased (patched)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.tokens <= 77:
            raise ValueError(f"tokens must be in 1..77, got {self.tokens}")
        if self.population < 2 or self.generations < 1:
            raise ValueError("need population >= 2 and generations >= 1")
        if not (0 <= self.mutation <= 1 and 0 <= self.crossover <= 1):
            raise ValueError("mutation and crossover are probabilities in [0, 1]")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")


class Encoders:
    """The CLIP encoders of a model as one function from token ids to flattened hidden states."""

    def __init__(self, model: LoadedModel) -> None:
        self.pairs = [(enc, tok) for _, enc, tok in model.clip_encoders()]
        self.tokenizer = self.pairs[0][1]
        self.length = self.tokenizer.model_max_length

    @torch.no_grad()
    def prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per encoder, ``[N, 77 * D]`` last hidden states of tokenised prompts (as the pipeline pads them)."""
        out = []
        for enc, tok in self.pairs:
            ids = tok(prompts, padding="max_length", max_length=self.length, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
            out.append(self._encode(enc, ids))
        return out

    @torch.no_grad()
    def tokens(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Per encoder, ``[N, 77 * D]`` for content ids ``[N, K]`` wrapped as ``[BOS, ids, EOS, pad…]``."""
        out = []
        for enc, tok in self.pairs:
            n, k = ids.shape
            full = torch.full((n, self.length), tok.pad_token_id, dtype=torch.long)
            full[:, 0], full[:, 1 : k + 1], full[:, k + 1] = tok.bos_token_id, ids, tok.eos_token_id
            out.append(self._encode(enc, full))
        return out

    def _encode(self, enc: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        dev = enc.device
        chunks = [enc(ids[i : i + FITNESS_BATCH].to(dev)).last_hidden_state.float().flatten(1).cpu()
                  for i in range(0, len(ids), FITNESS_BATCH)]  # fmt: skip
        return torch.cat(chunks)  # [N, 77 * D]


def concept_vector(encoders: Encoders, with_: list[str], without: list[str]) -> list[torch.Tensor]:
    """Per encoder, v ``[77 * D]`` = mean_i [E(with_i) − E(without_i)] over paired prompts."""
    return [(p - n).mean(0) for p, n in zip(encoders.prompts(with_), encoders.prompts(without))]


def concept_targets(
    encoders: Encoders, prompts: list[str], vector: list[torch.Tensor], eta: float
) -> list[torch.Tensor]:
    """Per encoder, targets ``[N, 77 * D]``: E(p_i) + η v for the attacked prompts p_i."""
    return [e + eta * v for e, v in zip(encoders.prompts(prompts), vector)]


def fitness(encoders: Encoders, ids: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
    """Squared distance ``[N]`` between each id sequence's encoding and the target (one ``[77 * D]`` per encoder)."""
    return sum(((h - t) ** 2).sum(-1) for h, t in zip(encoders.tokens(ids), target))


def next_generation(
    parents: torch.Tensor, vocab: torch.Tensor, config: RingABellConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The population bred from ``parents`` ``[H, K]`` (the best half): ``[H + 2C, K]`` for C crossovers.

    Parent i crosses, with probability ``crossover``, with a uniformly drawn parent j at a cut c uniform in
    0..K−1, giving ``i[:c] + j[c:]`` and ``j[:c] + i[c:]``; then every row (parents included) gets, with
    probability ``mutation``, one uniformly drawn position replaced by a uniformly drawn vocabulary token.

    Returns:
        The population (the H parents first) and a mask ``[H + 2C]`` of the rows that were mutated.
    """
    h, k = parents.shape
    crossing = (torch.rand(h, generator=g) < config.crossover).nonzero().squeeze(-1)  # [C] parent indices
    mates = parents[torch.randint(0, h, (len(crossing),), generator=g)]  # [C, K]
    cut = torch.randint(0, k, (len(crossing), 1), generator=g)  # [C, 1]
    head = torch.arange(k).unsqueeze(0) < cut  # [C, K], true before the cut
    mine = parents[crossing]
    pop = torch.cat([parents, torch.where(head, mine, mates), torch.where(head, mates, mine)])
    mutated = torch.rand(len(pop), generator=g) < config.mutation
    hit = mutated.nonzero().squeeze(-1)  # [M]
    where = torch.randint(0, k, (len(hit),), generator=g)
    pop[hit, where] = vocab[torch.randint(0, len(vocab), (len(hit),), generator=g)]
    return pop, mutated


def search(
    encoders: Encoders, target: list[torch.Tensor], vocab: torch.Tensor, k: int, config: RingABellConfig,
    g: torch.Generator,
) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """The genetic search for one target; returns the best ids ``[K]`` of the last generation and the best
    fitness of every generation (element 0: the initial population's)."""
    half = config.population // 2
    pop = vocab[torch.randint(0, len(vocab), (config.population, k), generator=g)]  # [P, K]
    fit = fitness(encoders, pop, target)
    history = []
    for step in track(range(config.generations), desc="ring-a-bell", total=config.generations):
        best = fit.argsort()[:half]
        parents, parent_fit = pop[best], fit[best]  # [H, K], [H], best first
        history.append(float(parent_fit[0]))
        if step == config.generations - 1:
            break
        pop, mutated = next_generation(parents, vocab, config, g)
        # an unmutated parent keeps its fitness (the encoder is deterministic); everything else is scored
        fresh = mutated.clone()
        fresh[half:] = True
        fit = torch.empty(len(pop))
        fit[~fresh] = parent_fit[~fresh[:half]]
        fit[fresh] = fitness(encoders, pop[fresh], target)
    return parents[0], history


def ring_a_bell(target: AttackTarget, config: RingABellConfig) -> AttackResult:
    """Ring-A-Bell: genetic search for K-token prompts whose encoding is near prompt + η · concept vector."""
    ps = target.prompts
    erased = config.encoder == "erased"
    key = (id(target.model), ps.concept, ps.concept_type, ps.positives, config)
    if not erased and key in _SEARCHES and _SEARCHES[key][0]() is target.model:
        # The search reads only the base encoder, so it is the same for every patch: run it once per model.
        ids, history, stats = _SEARCHES[key][1]
        return _result(target, ids, copy.deepcopy(history), {**copy.deepcopy(stats), "reused_search": True})
    g = torch.Generator().manual_seed(config.seed)
    with target.erased() if erased else contextlib.nullcontext():
        encoders = Encoders(target.model)
        k = min(config.tokens, encoders.length - 2)
        vocab = ordinary_tokens(encoders.tokenizer)
        with_, without = concept_pairs(ps.concept, ps.concept_type)
        vector = concept_vector(encoders, list(with_), list(without))
        targets = concept_targets(encoders, list(ps.positives), vector, config.eta)
        found, history = [], {}
        stats = {"content_tokens": k, "concept_pairs": len(with_), "initial_best": [], "final_best": []}
        for i in range(len(ps.positives)):
            goal = [t[i] for t in targets]
            ids, curve = search(encoders, goal, vocab, k, config, g)
            found.append(ids)
            history[f"best_fitness_{i}"] = curve
            stats["initial_best"].append(curve[0])
            stats["final_best"].append(curve[-1])
    ids = torch.stack(found)  # [N, K]
    stats["roundtrip_exact"] = sum(
        _roundtrips(encoders.tokenizer, t, row) for t, row in zip(_texts(encoders.tokenizer, ids), ids)
    )
    if not erased:
        if len(_SEARCHES) >= 64:
            _SEARCHES.pop(next(iter(_SEARCHES)))
        _SEARCHES[key] = (weakref.ref(target.model), (ids, copy.deepcopy(history), copy.deepcopy(stats)))
    return _result(target, ids, history, stats)


# Finished searches on the base encoder: (model id, prompts, config) -> (weak ref to the model, result).
_SEARCHES: dict[tuple[Any, ...], tuple[Any, tuple[torch.Tensor, dict[str, Any], dict[str, Any]]]] = {}


def _texts(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in ids]


def _result(
    target: AttackTarget, ids: torch.Tensor, history: dict[str, Any], stats: dict[str, Any]
) -> AttackResult:
    texts = _texts(target.model.clip_encoders()[0][2], ids)
    candidates = tuple(Candidate(prompt=t, group=i) for i, t in enumerate(texts))
    return AttackResult(candidates=candidates, patch=target.patch, embeddings={"token_ids": ids},
                        history=history, stats=stats)  # fmt: skip


def _roundtrips(tokenizer: Any, text: str, ids: torch.Tensor) -> bool:
    return tokenizer(text, add_special_tokens=False).input_ids == ids.tolist()


register_attack(
    "ring-a-bell",
    RingABellConfig,
    presets={
        "paper": {"tokens": 16, "style": {"eta": 0.9}, "object": {"eta": 0.9}, "nsfw": {"eta": 3.0}},
        "paper-k77": {"tokens": 77, "style": {"eta": 0.9}, "object": {"eta": 0.9}, "nsfw": {"eta": 3.0}},
        "quick": {
            "population": 64,
            "generations": 100,
            "style": {"eta": 0.9},
            "object": {"eta": 0.9},
            "nsfw": {"eta": 3.0},
        },
    },  # fmt: skip
    needs_pipeline=False,
    summary="Ring-A-Bell: genetic search over K tokens toward prompt + η·concept vector (text encoder only)",
)(ring_a_bell)
