"""The HiRM paper's ablations of *where to update* and *where to supervise*, as methods of their own.

Each reuses HiRM's implementation (:func:`erasekit.methods.hirm.erase_hirm`) and its ``paper`` preset (random
target, c = 5000, README steps and learning rates), changing only the trained blocks and the supervision point:

- ``hirm-ablate-block0``: update block 0, loss at block 0's output (``supervision="block:0"``). The paper
  shows this over-erases: the update and the supervision are no longer decoupled.
- ``hirm-ablate-all``: update every block, loss at the last block's attention output (HiRM's point).
- ``hirm-ablate-last``: update the last block only, loss at the same point.

"Every block" depends on the encoder's depth (12 for SD1.x's CLIP-L, 6 for MiniCanvas), so that ablation
has its own config with ``every_block=True``, which sets ``blocks`` to all of them at erase time.

HiRM's patch holds every trained tensor; these ablations drop the ones the loss never reached (e.g. the last
block's MLP, which sits after the supervision point), so a patch holds only changed tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from erasekit.errors import ErasekitError
from erasekit.methods.common import drop_unchanged
from erasekit.methods.hirm import HirmConfig, erase_hirm
from erasekit.methods.hirm.config import presets as hirm_presets
from erasekit.models.families import num_blocks
from erasekit.patch import Patch
from erasekit.registry import Strength, register

if TYPE_CHECKING:
    from erasekit.models.loading import LoadedModel


@dataclass(frozen=True, kw_only=True)
class EveryBlockConfig(HirmConfig):
    """HiRM's config, plus a switch that trains every block of the encoder whatever its depth."""

    every_block: bool = field(
        default=True, metadata={"help": "train every block (replaces blocks at erase time)"}
    )


def _presets(**fields: Any) -> dict[str, dict[str, Any]]:
    return {name: {**preset, **fields} for name, preset in hirm_presets(coefficient=5000.0).items()}


def erase_block0(model: LoadedModel, concepts: Sequence[str], config: HirmConfig) -> Patch:
    """Ablation: update block 0 with the loss at block 0's output (coupled update and supervision)."""
    return drop_unchanged(erase_hirm(model, concepts, config, "hirm-ablate-block0"), model)


def erase_last(model: LoadedModel, concepts: Sequence[str], config: HirmConfig) -> Patch:
    """Ablation: update the last block only, with HiRM's loss at the last block."""
    return drop_unchanged(erase_hirm(model, concepts, config, "hirm-ablate-last"), model)


def erase_all(model: LoadedModel, concepts: Sequence[str], config: EveryBlockConfig) -> Patch:
    """Ablation: update every block, with HiRM's loss at the last block."""
    if config.every_block:
        depths = {num_blocks(enc) for _, enc, _ in model.clip_encoders()}
        if len(depths) != 1:
            raise ErasekitError(
                f"every_block needs text encoders of one depth, got {sorted(depths)}; pass blocks instead"
            )
        config = dataclasses.replace(config, blocks=tuple(range(depths.pop())))
    return drop_unchanged(erase_hirm(model, concepts, config, "hirm-ablate-all"), model)


register(
    "hirm-ablate-block0",
    HirmConfig,
    presets=_presets(blocks=(0,), supervision="block:0"),
    strength=Strength("steps", (5, 10, 20, 40, 80)),
    summary="HiRM ablation: update block 0 and supervise at block 0's output",
)(erase_block0)
register(
    "hirm-ablate-all",
    EveryBlockConfig,
    presets=_presets(supervision="attn_out:-1"),
    strength=Strength("steps", (5, 10, 20, 40, 80)),
    summary="HiRM ablation: update every block, supervise at the last block",
)(erase_all)
register(
    "hirm-ablate-last",
    HirmConfig,
    presets=_presets(blocks=(-1,), supervision="attn_out:-1"),
    strength=Strength("steps", (5, 10, 20, 40, 80)),
    summary="HiRM ablation: update the last block only, supervise at the last block",
)(erase_last)
