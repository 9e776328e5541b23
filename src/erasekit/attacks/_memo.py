"""A per-process memo of what an attack computes from the base model alone.

A bench attacks every row of a concept with one budget. Part of some attacks' work never sees the erasure: the
base model's images of the concept (every latent and embedding scenario starts from them), the latents a
black-box attacker inverts through the base model, the embedding it learns there. That part is the same for
every row, so it is made once per process and handed out again: a ``textual-inversion-transfer`` column then
costs one textual inversion per concept instead of one per row.

A value is keyed by the SHA-256 of every base tensor (:func:`~erasekit.evaluation.record.model_fingerprint`),
the pipeline's scheduler config and the ``repr`` of everything else it depends on (prompts, seeds, budget,
sampling), so a changed weight, prompt, budget or sampling makes it again. It is only ever computed with nothing
applied (outside :meth:`~erasekit.attacks.base.AttackTarget.erased`). Values go in and come out as clones, so no
caller can change another's. The memo keeps the :data:`KEEP` values used last; they are small (a latent or an
embedding per base prompt).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")
KEEP = 64
_MEMO: OrderedDict[str, Any] = OrderedDict()
_OFF = [False]  # inside disabled()


class BaseModelMemo:
    """The memo seen from one attack target's base model: :meth:`get` keys on its fingerprint.

    The fingerprint is the target's ``base_fingerprint`` (computed once per run by
    :func:`~erasekit.attacks.run.run_attack`, which also records it), or computed here when the target has none.
    """

    def __init__(self, target: Any) -> None:
        from erasekit.evaluation.record import model_fingerprint

        model = target.model
        fingerprint = target.base_fingerprint or model_fingerprint(model.components)
        self.base = fingerprint + repr(sorted(dict(model.pipeline.scheduler.config).items()))

    def get(self, what: str, parts: tuple[Any, ...], make: Callable[[], T]) -> T:
        """``make()``'s value for ``what`` and ``parts``, made once per process (a clone of it each time)."""
        if _OFF[0]:
            return make()
        key = hashlib.sha256(f"{self.base}|{what}|{parts!r}".encode()).hexdigest()
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return cloned(_MEMO[key])
        value = make()
        _MEMO[key] = cloned(value)
        while len(_MEMO) > KEEP:
            _MEMO.popitem(last=False)
        return value


def cloned(value: T) -> T:
    """``value`` with every tensor in it (nested in tuples, lists and dicts) cloned."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(cloned(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, list):
        return [cloned(v) for v in value]  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: cloned(v) for k, v in value.items()}  # type: ignore[return-value]
    return value


def clear() -> None:
    """Forget every value (tests use it to count what is made)."""
    _MEMO.clear()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block every value is made afresh and not kept (benchmarks/attack_memo.py's plain variant)."""
    _OFF[0] = True
    try:
        yield
    finally:
        _OFF[0] = False
