"""Prompt-set loaders: the documented columns of each public set, and clear errors naming the line."""

from pathlib import Path

import pytest

from erasekit.errors import ErasekitError
from erasekit.evaluation.prompts import FORMATS, load_prompts

FIX = Path(__file__).parent / "fixtures"


def test_i2p_keeps_seed_guidance_and_quoted_commas():
    recs = load_prompts(FIX / "i2p_small.csv", "i2p")
    assert [r.seed for r in recs] == [1234, 42, 4242]
    assert [r.guidance for r in recs] == [7.0, 7.5, 8.0]
    assert recs[0].prompt == "a quiet harbour at dawn, oil painting"
    assert recs[2].prompt == 'an abstract composition, "bold" colours'
    assert recs[1].meta["categories"] == "self-harm"


def test_limit_keeps_the_first_prompts():
    assert [r.seed for r in load_prompts(FIX / "i2p_small.csv", "i2p", limit=2)] == [1234, 42]


def test_mma_uses_the_adversarial_prompt():
    recs = load_prompts(FIX / "mma_small.csv", "mma")
    assert [r.prompt for r in recs] == ["xq beach zzv scene", "street qpl city"]
    assert recs[0].seed is None and recs[0].meta["clean_prompt"] == "a beach at noon"


@pytest.mark.parametrize("name", ["ringabell_small.csv", "ringabell_small.txt"])
def test_ringabell_csv_and_plain_text(name):
    recs = load_prompts(FIX / name, "ringabell")
    assert [r.prompt for r in recs] == ["a statue in a museum hall", "a painting of a garden"]


def test_unlearndiffatk_optional_guidance():
    recs = load_prompts(FIX / "unlearndiffatk_small.csv", "unlearndiffatk")
    assert [(r.seed, r.guidance) for r in recs] == [(2922, 7.5), (3001, None)]


def test_coco_prompt_column():
    recs = load_prompts(FIX / "coco_small.csv", "coco")
    assert recs[1].prompt == "Two dogs playing in the snow." and recs[1].seed == 12
    assert recs[1].meta["coco_id"] == "522418"


@pytest.mark.parametrize(
    "name, fmt, message",
    [
        ("i2p_bad_seed.csv", "i2p", "i2p_bad_seed.csv:3: evaluation_seed is 'seventeen'"),
        ("i2p_missing_column.csv", "i2p", "i2p_missing_column.csv:1: no 'evaluation_guidance' column"),
        ("coco_ragged.csv", "coco", "coco_ragged.csv:3: 3 fields, but the header has 2"),
        ("mma_small.csv", "i2p", "mma_small.csv:1: no 'prompt' column"),
    ],
)
def test_malformed_files_name_the_line(name, fmt, message):
    with pytest.raises(ErasekitError, match=message.replace(".", r"\.")):
        load_prompts(FIX / name, fmt)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ErasekitError, match="unknown prompt format"):
        load_prompts(FIX / "coco_small.csv", "laion")
    with pytest.raises(ErasekitError, match="no prompt file"):
        load_prompts(tmp_path / "nope.csv", "coco")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ErasekitError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt", "txt")
    assert "txt" in FORMATS
