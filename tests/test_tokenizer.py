"""The offline CLIP tokenizer must be SD1.x's, id for id."""

from __future__ import annotations

import html

import pytest
import regex

from erasekit.models.tokenizer import BOS, EOS, bytes_to_unicode, clip_tokenizer, clip_vocab_and_merges

# fmt: off
GOLDEN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "Van Gogh": [49406, 2451, 19697, 49407],
    "A watercolor painting of a dog, by Van Gogh!": [
        49406, 320, 14211, 3086, 539, 320, 1929, 267, 638, 2451, 19697, 256, 49407,
    ],
    "Hello   WORLD": [49406, 3306, 1002, 49407],
}
# fmt: on
PROMPTS = [
    *GOLDEN,
    "naïve café déjà vu",
    "room 101: 3.14 and 2,000 cats",
    "東京タワー",
    "it's a photo-realistic image :)",
    "Ünïcödé & <html> tags; semi-colons... and ellipses",
    "naked ,nude, bare, exposed, Stripped, topless, male genitalia, penis, buttocks",
]


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def reference_encode(text: str) -> list[int]:
    """An independent, plain re-implementation of CLIP's BPE (lowercase, regex split, greedy merges by rank)."""
    vocab, merges = clip_vocab_and_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    byte_map = bytes_to_unicode()
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    text = regex.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
    ids = [vocab[BOS]]
    for word in pattern.findall(text):
        parts = [byte_map[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids + [vocab[EOS]]


def test_special_tokens_and_size(tok):
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77


@pytest.mark.parametrize("prompt", list(GOLDEN))
def test_known_ids(tok, prompt):
    assert tok(prompt).input_ids == GOLDEN[prompt]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_plain_bpe(tok, prompt):
    assert tok(prompt).input_ids == reference_encode(prompt)


def test_padding_and_truncation(tok):
    ids = tok("x", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[:3] == [49406, 343, 49407] and set(ids[3:]) == {49407}
    long = tok("cat " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_sd2_pads_with_zero():
    assert clip_tokenizer(pad_token="!").pad_token_id == 0


def test_round_trip_text(tok):
    assert tok.decode(tok("Hello   WORLD").input_ids, skip_special_tokens=True) == "hello world"
