"""Stable Diffusion's CLIP tokenizer, built offline from OpenAI's vendored BPE vocabulary."""

from __future__ import annotations

import functools
import gzip
from importlib import resources
from typing import Any

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.cache
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49408-entry vocabulary and the 48894 merges, in CLIP's order."""
    raw = resources.files("erasekit.models").joinpath("data", BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(max_length: int = 77, pad_token: str = EOS) -> Any:
    """A transformers ``CLIPTokenizer`` identical to SD1.x's (vocab 49408, bos 49406, eos = pad 49407).

    Args:
        max_length: ``model_max_length`` (77 for every Stable Diffusion text encoder).
        pad_token: SD1.x pads with ``<|endoftext|>``; SD2's OpenCLIP pads with ``"!"`` (id 0).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
    )
