"""Session-wide fixtures: tiny seeded model folders of every family, written once per test session.

The folders are shared between tests: load them (``erasekit.load(dir)`` gives fresh modules each time) but never
write into them. ``tiny_model_dir(family, components=None, seed=0)`` writes (or reuses) any other variant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FAMILY_NAMES = ("sd15", "sd2", "sdxl", "sd3", "flux")
TE_ONLY = {  # the CLIP side of each family: what text-encoder-only methods need
    "sd15": "text_encoder,tokenizer",
    "sd2": "text_encoder,tokenizer",
    "sdxl": "text_encoder,text_encoder_2,tokenizer,tokenizer_2",
    "sd3": "text_encoder,text_encoder_2,tokenizer,tokenizer_2",
    "flux": "text_encoder,tokenizer",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[..., Path]:
    """``make(family, components=None, seed=0) -> Path``: a tiny diffusers folder, cached for the session."""
    from erasekit.models.tiny import write_model

    cache: dict[tuple, Path] = {}

    def make(family: str, components: str | None = None, seed: int = 0) -> Path:
        key = (family, components, seed)
        if key not in cache:
            name = f"{family}-{(components or 'all').replace(',', '+')}-{seed}"
            cache[key] = write_model(
                family, tmp_path_factory.mktemp("models") / name, "tiny", components, seed
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_sd15_dir(tiny_model_dir) -> Path:
    """A complete tiny SD1.x pipeline folder (CLIP-L-shaped encoder: 3 blocks, hidden 32)."""
    return tiny_model_dir("sd15")


@pytest.fixture(scope="session")
def tiny_sd15_te_dir(tiny_model_dir) -> Path:
    """A tiny SD1.x folder holding only ``text_encoder/`` and ``tokenizer/`` (same weights as ``tiny_sd15_dir``)."""
    return tiny_model_dir("sd15", TE_ONLY["sd15"])


@pytest.fixture(scope="session")
def tiny_sd2_dir(tiny_model_dir) -> Path:
    """A complete tiny SD2.x pipeline folder (OpenCLIP-H-shaped encoder: 5 blocks, GELU, pads with "!")."""
    return tiny_model_dir("sd2")


@pytest.fixture(scope="session")
def tiny_sd2_te_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("sd2", TE_ONLY["sd2"])


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_model_dir) -> Path:
    """A complete tiny SDXL pipeline folder (two CLIP encoders: hidden 32 and 48)."""
    return tiny_model_dir("sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_te_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("sdxl", TE_ONLY["sdxl"])


@pytest.fixture(scope="session")
def tiny_sd3_dir(tiny_model_dir) -> Path:
    """A complete tiny SD3 pipeline folder (two CLIP encoders plus a tiny T5 with a stand-in tokenizer)."""
    return tiny_model_dir("sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir(tiny_model_dir) -> Path:
    """A complete tiny Flux pipeline folder (CLIP-L-shaped encoder plus a tiny T5)."""
    return tiny_model_dir("flux")
