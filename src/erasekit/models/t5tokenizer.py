"""A stand-in T5 tokenizer for SD3 and Flux models built offline.

SD3 and Flux pair their CLIP encoders with T5-XXL, whose SentencePiece vocabulary (32000 pieces plus 100
sentinels) cannot be downloaded here. This module trains a small Unigram tokenizer with the ``tokenizers``
library and wraps it as transformers' ``T5Tokenizer`` (the class diffusers' SD3 and Flux pipelines call), so
tiny and full-size SD3/Flux folders have a working ``tokenizer_3``/``tokenizer_2``.

It is **not** T5's real vocabulary: ids mean nothing to a real T5 checkpoint. It is fit only for models with
random weights, whose T5 encoder is never edited by erasekit's methods anyway.

The training corpus is built in: a quarter of the whole English words in CLIP's vendored BPE vocabulary
(about 10k words, some capitalised), which needs no download, trains in a second or two and gives the same
tokenizer every time.
"""

from __future__ import annotations

import functools
import json
import string
from typing import Any

from erasekit.models.tokenizer import clip_vocab_and_merges

VOCAB_SIZE = 1000  # pieces learned, before T5's 100 ``<extra_id_N>`` sentinels are appended
SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
MAX_LENGTH = 512


def corpus_words() -> list[str]:
    """The built-in corpus: about 10k whole alphabetic words from the CLIP BPE vocabulary."""
    vocab, _ = clip_vocab_and_merges()
    words = (tok[: -len("</w>")] for tok in vocab if tok.endswith("</w>"))
    words = [w for w in words if w.isascii() and w.isalpha() and len(w) > 1]
    # every fourth word keeps training to a second or two; some capitalised, as T5 is case-sensitive
    return words[::4] + [w.capitalize() for w in words[1::16]]


@functools.cache
def _trained_vocab(vocab_size: int) -> tuple[tuple[str, float], ...]:
    """Train a Unigram model on :func:`corpus_words`; returns ``(piece, log-prob)`` with the specials first."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        unk_token="<unk>",
        initial_alphabet=list(string.printable.strip()),  # every printable ASCII character has a piece
        show_progress=False,
    )
    tok.train_from_iterator(corpus_words(), trainer=trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return tuple((piece, float(score)) for piece, score in vocab)


def t5_tokenizer(vocab_size: int = VOCAB_SIZE, max_length: int = MAX_LENGTH) -> Any:
    """A transformers ``T5Tokenizer`` over a Unigram vocabulary trained in code (NOT T5's real vocabulary).

    Ids follow T5's conventions: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, every sequence ends with ``</s>``, and
    100 sentinels ``<extra_id_0..99>`` follow the learned pieces.

    Args:
        vocab_size: pieces to learn (the tokenizer's length is this plus 100 sentinels).
        max_length: ``model_max_length`` (SD3 uses 256 tokens of it, Flux 512).
    """
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_trained_vocab(vocab_size)), extra_ids=100, model_max_length=max_length)
