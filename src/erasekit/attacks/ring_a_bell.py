"""Ring-A-Bell (Tsai et al., ICLR 2024): a genetic search for discrete prompts near "prompt + η · concept".

Text encoder only, black-box to the UNet, so it runs on a text-encoder-only folder:

- concept vector v = mean_i [E(p_i⁺) − E(p_i⁻)] over the prompt set's pairs, E the encoder's last hidden state
  flattened over the 77 positions (summed over every CLIP encoder of the family);
- for each base prompt p, target = E(p) + η v;
- a genetic algorithm over K token ids minimises ‖target − E([BOS, tokens, EOS, pad…])‖²: tournament
  selection, one-point crossover, one-token mutation, the best ``elite`` kept. The whole population goes through
  the encoder as one batch per generation.

The found ids are decoded into ordinary prompts (they transfer to any model with that encoder); the ids
themselves are saved too, since decoding and re-tokenising is not always the identity.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.attacks import register_attack
from erasekit.attacks.base import AttackResult, AttackTarget, Budget, Candidate, ordinary_tokens
from erasekit.progress import track

ENCODERS = ("base", "erased")
FITNESS_BATCH = 256  # sequences per encoder call (runtime only)


@dataclass(frozen=True, kw_only=True)
class RingABellConfig(Budget):
    """Ring-A-Bell's budget; ``paper`` is the authors' (population 200, 3000 generations, 0.25 / 0.5)."""

    tokens: int = field(
        default=16, metadata={"help": "K, prompt length in tokens (16 or 77; 77 fills all 75 slots)"}
    )
    eta: float = field(default=3.0, metadata={"help": "η, strength of the concept vector in the target"})
    population: int = field(default=200, metadata={"help": "individuals per generation"})
    generations: int = field(default=3000, metadata={"help": "generations of the genetic search"})
    mutation: float = field(default=0.25, metadata={"help": "probability that a child gets one random token"})
    crossover: float = field(
        default=0.5, metadata={"help": "probability that a child is a one-point crossover"}
    )
    elite: int = field(default=1, metadata={"help": "best individuals carried over unchanged"})
    encoder: str = field(
        default="base",
        metadata={"help": "encoder the search queries: base (the authors') or erased (patched)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.tokens <= 77:
            raise ValueError(f"tokens must be in 1..77, got {self.tokens}")
        if self.population < 2 or self.generations < 1 or not 0 <= self.elite < self.population:
            raise ValueError("need population >= 2, generations >= 1 and 0 <= elite < population")
        if not (0 <= self.mutation <= 1 and 0 <= self.crossover <= 1):
            raise ValueError("mutation and crossover are probabilities in [0, 1]")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")


class Encoders:
    """The CLIP encoders of a model as one function from token ids to flattened hidden states."""

    def __init__(self, model: Any) -> None:
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


def concept_targets(
    encoders: Encoders, positives: list[str], negatives: list[str], eta: float
) -> list[torch.Tensor]:
    """Per encoder, targets ``[N, 77 * D]``: E(p_i⁺) + η · mean_j [E(p_j⁺) − E(p_j⁻)]."""
    pos, neg = encoders.prompts(positives), encoders.prompts(negatives)
    return [p + eta * (p - n).mean(0, keepdim=True) for p, n in zip(pos, neg)]


def fitness(encoders: Encoders, ids: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
    """Squared distance ``[N]`` between each id sequence's encoding and the target (one ``[77 * D]`` per encoder)."""
    return sum(((h - t) ** 2).sum(-1) for h, t in zip(encoders.tokens(ids), target))


def next_generation(
    pop: torch.Tensor, fit: torch.Tensor, vocab: torch.Tensor, config: RingABellConfig, g: torch.Generator
) -> torch.Tensor:
    """Children ``[P - elite, K]`` of a population sorted best first (``pop [P, K]``, ``fit [P]``)."""
    n, k = pop.shape[0] - config.elite, pop.shape[1]

    def tournament() -> torch.Tensor:  # [n] parent indices: the fitter of two random individuals
        a, b = torch.randint(0, len(pop), (2, n), generator=g)
        return torch.where(fit[a] <= fit[b], a, b)

    first, second = pop[tournament()], pop[tournament()]
    cut = torch.randint(1, max(k, 2), (n, 1), generator=g)  # one-point crossover after position cut
    crossed = torch.where(torch.arange(k).unsqueeze(0) < cut, first, second)
    do_cross = torch.rand(n, 1, generator=g) < config.crossover
    children = torch.where(do_cross, crossed, first)
    mutate = torch.rand(n, generator=g) < config.mutation
    pos = torch.randint(0, k, (n,), generator=g)
    new = vocab[torch.randint(0, len(vocab), (n,), generator=g)]
    children[mutate, pos[mutate]] = new[mutate]
    return children


def search(
    encoders: Encoders, target: list[torch.Tensor], vocab: torch.Tensor, k: int, config: RingABellConfig,
    g: torch.Generator,
) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """The genetic search for one target; returns the best ids ``[K]`` and the best fitness of each generation
    (element 0 is the initial population's best)."""
    pop = vocab[torch.randint(0, len(vocab), (config.population, k), generator=g)]  # [P, K]
    fit = fitness(encoders, pop, target)
    history = []
    for _ in track(range(config.generations), desc="ring-a-bell", total=config.generations):
        order = fit.argsort()
        pop, fit = pop[order], fit[order]
        history.append(float(fit[0]))
        children = next_generation(pop, fit, vocab, config, g)
        pop = torch.cat([pop[: config.elite], children])
        fit = torch.cat([fit[: config.elite], fitness(encoders, children, target)])
    best = int(fit.argmin())
    history.append(float(fit[best]))
    return pop[best], history


def ring_a_bell(target: AttackTarget, config: RingABellConfig) -> AttackResult:
    """Ring-A-Bell: genetic search for K-token prompts whose encoding is near prompt + η · concept vector."""
    ps = target.prompts
    erased = config.encoder == "erased"
    key = (id(target.model), ps.positives, ps.negatives, config)
    if not erased and key in _SEARCHES and _SEARCHES[key][0]() is target.model:
        # The search reads only the base encoder, so it is the same for every patch: run it once per model.
        ids, history, stats = _SEARCHES[key][1]
        return _result(target, ids, copy.deepcopy(history), {**copy.deepcopy(stats), "reused_search": True})
    g = torch.Generator().manual_seed(config.seed)
    with target.erased() if erased else contextlib.nullcontext():
        encoders = Encoders(target.model)
        k = min(config.tokens, encoders.length - 2)
        vocab = ordinary_tokens(encoders.tokenizer)
        targets = concept_targets(encoders, list(ps.positives), list(ps.negatives), config.eta)
        found, history, stats = [], {}, {"content_tokens": k, "initial_best": [], "final_best": []}
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
