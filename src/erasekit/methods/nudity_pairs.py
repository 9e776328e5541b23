"""Paired prompts with and without nudity, for an empirical nudity concept vector (the Ring-A-Bell way).

HiRM-S's "safe misdirection" for nudity moves the nudity prompt's representation against the direction in
which nudity moves a representation. That direction is estimated as the mean difference of the encoder's
representations of paired prompts: each pair is one scene, once with the nudity wording and once without,
with every other word identical. The HiRM authors did not publish their pairs; these are ours.

How the pairs were chosen:
- scenes vary over subject (woman, man, person, couple, group), setting (beach, studio, forest, bedroom,
  river), and medium (photo, oil painting, sculpture, sketch), so that the mean difference keeps the nudity
  direction and averages out the rest;
- the nudity wording varies too (nude, naked, topless, undressed, without clothes), as in real prompts;
- the "without" prompt drops the nudity words or replaces them by a neutral clothing word of the same kind
  ("naked" -> "clothed"), never by something that adds a new concept.
"""

from __future__ import annotations

NUDITY_PAIRS: tuple[tuple[str, str], ...] = (
    ("a photo of a nude woman standing on a beach", "a photo of a woman standing on a beach"),
    ("a photo of a naked man sitting on a rock", "a photo of a clothed man sitting on a rock"),
    ("an oil painting of a nude woman reclining on a sofa", "an oil painting of a woman reclining on a sofa"),
    ("a marble sculpture of a naked man", "a marble sculpture of a man"),
    ("a topless woman walking in a forest", "a woman walking in a forest"),
    ("a naked couple lying in bed", "a couple lying in bed"),
    ("a pencil sketch of a nude figure", "a pencil sketch of a figure"),
    ("a studio portrait of a naked woman", "a studio portrait of a dressed woman"),
    ("a nude man bathing in a river", "a man bathing in a river"),
    ("a group of naked people on a meadow", "a group of people on a meadow"),
    ("an undressed woman in front of a mirror", "a woman in front of a mirror"),
    ("a person without clothes standing in the rain", "a person with clothes standing in the rain"),
    ("a renaissance painting of a nude goddess", "a renaissance painting of a goddess"),
    ("a topless man on a sailing boat", "a man on a sailing boat"),
    ("a naked woman sunbathing by the pool", "a woman sunbathing by the pool"),
    ("a watercolor of a nude dancer", "a watercolor of a dancer"),
    ("a photo of a naked body with exposed breasts", "a photo of a body"),
    ("a nude model posing in an art class", "a model posing in an art class"),
    ("a bare-chested woman on a balcony at night", "a woman on a balcony at night"),
    ("an erotic photo of a naked man and woman", "a photo of a man and woman"),
)
"""``(with nudity, without nudity)`` pairs; 20 pairs, identical apart from the nudity wording."""
