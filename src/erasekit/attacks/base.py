"""The attack interface: what an attack is given, what it returns, and the budget fields every attack has.

An attack is ``fn(target: AttackTarget, config) -> AttackResult``. It may query the erased model (the target's
patch applied, through :meth:`AttackTarget.erased`) and the base model (nothing applied), and must leave the
model exactly as it found it. What it returns is a list of :class:`Candidate` conditionings (a prompt, possibly
with learned embedding rows for its placeholder tokens) that the runner generates and scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from erasekit.errors import ErasekitError
from erasekit.generation import Sampling

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel
    from erasekit.patch import Patch

#: The placeholder token whose input-embedding rows learned embeddings replace (one CLIP token, "*</w>").
PLACEHOLDER = "*"
PHASES = ("attack", "pre")


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Fields every attack budget has (subclasses add their own)."""

    prompts: int = field(
        default=12, metadata={"help": "base prompts that ask for the concept (attack targets)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of every random choice of the attack"})

    def __post_init__(self) -> None:
        if self.prompts < 1:
            raise ValueError(f"prompts must be >= 1, got {self.prompts}")


@dataclass(frozen=True, kw_only=True)
class PromptSet:
    """The prompts an attack starts from, for one concept.

    Attributes:
        concept: the concept's name.
        concept_type: ``style``, ``object`` or ``nsfw``.
        positives: prompts that ask for the concept.
        negatives: the same prompts without the concept (paired with ``positives``).
        placeholders: ``positives`` with the concept's name replaced by :data:`PLACEHOLDER`.
        synonyms: other names of the concept.
        paraphrases: per base prompt, other wordings that name the concept.
        source: where the prompts come from (``minicanvas``, ``nsfw`` or ``generic``).
    """

    concept: str
    concept_type: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    placeholders: tuple[str, ...]
    synonyms: tuple[str, ...] = ()
    paraphrases: tuple[tuple[str, ...], ...] = ()
    source: str = "generic"

    def __post_init__(self) -> None:
        if not (len(self.positives) == len(self.negatives) == len(self.placeholders)) or not self.positives:
            raise ErasekitError(
                "a prompt set needs equally many (non-zero) positives, negatives, placeholders"
            )

    def first(self, n: int) -> PromptSet:
        """The first ``n`` prompts (all of them when there are fewer)."""
        from dataclasses import replace

        return replace(self, positives=self.positives[:n], negatives=self.negatives[:n],
                       placeholders=self.placeholders[:n], paraphrases=self.paraphrases[:n])  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AttackTarget:
    """What an attack is run against.

    Attributes:
        model: the :class:`~erasekit.models.loading.LoadedModel`, unpatched (the base model).
        patch: the erasure under attack (all ``--patch`` composed: a Patch or a
            :class:`~erasekit.hooked.HookedPatch`), or ``None`` for the base model itself.
        prompts: the prompt set, already cut to the budget's ``prompts``.
        sampling: how the run generates (the model's defaults unless the user set them).
        seeds: the run's image seeds (each candidate is generated once per seed).
        judge: ``judge(candidates) -> [succeeded]``, one verdict per candidate: it generates each candidate once
            with the run's first seed on the model *as it is when called* (call it inside :meth:`erased` to judge
            the erased model) and asks the run's detector. ``None`` when there is no detector (a model without a
            pipeline, or a test); attacks that stop at the first success then run their whole schedule.
        base_fingerprint: :func:`~erasekit.evaluation.record.model_fingerprint` of ``model``, computed once by
            :func:`~erasekit.attacks.run.run_attack` (hashing every base tensor takes seconds at SD size); ``None``
            when the caller did not compute it (then whoever needs it computes it).
    """

    model: LoadedModel
    patch: Patch | None
    prompts: PromptSet
    sampling: Sampling
    seeds: tuple[int, ...] = (0,)
    judge: Callable[[Sequence[Candidate]], list[bool]] | None = None
    base_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ErasekitError("an attack needs at least one image seed")

    @contextlib.contextmanager
    def erased(self) -> Iterator[Any]:
        """The model with the patch applied inside the block (fingerprints checked), restored after."""
        if self.patch is None:
            yield self.model
            return
        with self.patch.applied(self.model):
            yield self.model


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One conditioning to generate with.

    Attributes:
        prompt: the text; each :data:`PLACEHOLDER` token in it takes one row of ``embedding``.
        group: index of the base prompt it attacks (``target.prompts.positives[group]``).
        phase: ``attack``, or ``pre`` for the unattacked prompt (UnlearnDiffAtk's pre-attack rate).
        embedding: ``[k, D]`` input-embedding rows for the k placeholders, or ``None`` for a plain prompt.
        seeds: this candidate's own seeds (seed search), or ``None`` for the run's.
        text: the human-readable form written to ``prompts.txt`` (decoded tokens); ``prompt`` when ``None``.
        init: ``[H, W, 3]`` float image in [0, 1] that ``prompt`` edits (SDEdit), or ``None`` to sample from noise.
        strength: the edit strength in (0, 1], with ``init`` (see :class:`~erasekit.generation.Request`).
        latents: ``[C, h, w]`` initial latents to start from instead of the seed's noise (an inverted image), or
            ``None``.
        tag: a label the run reports a separate rate for (``ASR_by_tag``), e.g. ``reedit@0.5`` or the
            regeneration prompt of an inverted latent.
    """

    prompt: str
    group: int
    phase: str = "attack"
    embedding: torch.Tensor | None = None
    seeds: tuple[int, ...] | None = None
    text: str | None = None
    init: np.ndarray | None = None
    strength: float | None = None
    latents: torch.Tensor | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if (self.init is None) != (self.strength is None):
            raise ValueError("an edit candidate needs both an init image and a strength")
        if self.init is not None and self.latents is not None:
            raise ValueError("a candidate starts from an init image or from its own latents, not both")


@dataclass(frozen=True, kw_only=True)
class AttackResult:
    """What an attack found.

    Attributes:
        candidates: the conditionings to generate and score.
        patch: the patch to generate with: the target's, or a changed one (encoder swap).
        embeddings: tensors saved as ``embeddings.safetensors`` (learned rows, token ids).
        history: per-step curves (``loss``, ``best_fitness``) saved with the run.
        stats: scalar results of the optimisation (losses before/after, distances).
    """

    candidates: tuple[Candidate, ...]
    patch: Any | None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


# ---- placeholder embeddings ------------------------------------------------------------------------------


def placeholder_id(tokenizer: Any) -> int:
    """The single token id of :data:`PLACEHOLDER` under ``tokenizer``."""
    ids = tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ErasekitError(f"the tokenizer splits the placeholder {PLACEHOLDER!r} into {len(ids)} tokens")
    return int(ids[0])


@contextlib.contextmanager
def placeholder_rows(encoder: torch.nn.Module, token_id: int, rows: torch.Tensor) -> Iterator[None]:
    """Inside the block, the input embeddings of every ``token_id`` occurrence are replaced by ``rows``.

    A removable forward hook on the token embedding (removed in ``finally``); gradients flow to ``rows``.

    Args:
        encoder: a CLIP text encoder.
        token_id: the placeholder's id (:func:`placeholder_id`).
        rows: ``[k, D]`` (the same k rows for every sequence) or ``[B, k, D]`` (one set per sequence); every
            sequence must hold exactly k placeholders, filled in order.
    """
    from erasekit.models.families import token_embedding_path

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        mask = args[0] == token_id  # [B, L]
        k = rows.shape[-2]
        if not bool((mask.sum(1) == k).all()):
            raise ErasekitError(f"every prompt must hold exactly {k} placeholder token(s) {PLACEHOLDER!r}")
        fill = rows.expand(out.shape[0], -1, -1) if rows.ndim == 2 else rows  # [B, k, D]
        return out.masked_scatter(mask.unsqueeze(-1), fill.to(out.dtype).reshape(-1, out.shape[-1]))

    handle = encoder.get_submodule(token_embedding_path(encoder)).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_table(encoder: torch.nn.Module) -> torch.Tensor:
    """The encoder's input token-embedding matrix ``[V, D]`` (a view of the live weights)."""
    return encoder.get_input_embeddings().weight


def ordinary_tokens(tokenizer: Any) -> torch.Tensor:
    """Ids ``[V']`` of every vocabulary token that is not a special token (the search space of token attacks)."""
    special = set(tokenizer.all_special_ids) | {placeholder_id(tokenizer)}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def with_placeholders(prompt: str, k: int) -> str:
    """``prompt`` with ``k`` placeholder tokens in front (space separated, so each stays one token)."""
    return " ".join([PLACEHOLDER] * k + [prompt]).strip()
