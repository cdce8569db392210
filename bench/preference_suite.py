"""The preference suite: scripted annotators with different tastes, each judged by its own feature.

In:  an answer's text.
Out: per taste, a score (higher is preferred; equal scores tie), the way that annotator gives its
     verdict in Label Studio (which template), and a one-line description.

Defaults are chosen on the whole suite, never on one taste (issue 15): a loop that only learns
"shorter" has learnt the easiest shortcut of a small model, not what annotators want. The tastes
cover length in both directions, content, form, tone and wording, and four verdict formats:
- "tiers":   a perfect annotator: one tier per distinct score, equal answers tied;
- "ranker":  Label Studio's ranker, which has no ties: equally good answers in the order shown;
- "buckets": the bucket ranker's Good / Acceptable / Bad (best score, between, worst);
- "pairwise": the pairwise template: only the first two candidates are shown, the better one
             wins, a tie gives nothing.
The score *is* the taste's feature, so a win by the score is a win on the feature itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

VERDICTS = ("tiers", "ranker", "buckets", "pairwise")


@dataclass(frozen=True)
class Taste:
    name: str
    score: Callable[[str], float]
    verdict: str  # one of VERDICTS: how this annotator ranks in Label Studio
    about: str  # length, content, form, tone or wording


def contains_number(answer: str) -> float:
    return float(bool(re.search(r"\d", answer)))


def shorter(answer: str) -> float:
    return -float(len(answer))


def longer(answer: str) -> float:
    """More words: the opposite of "shorter", so a loop that only learnt to stop early loses here."""
    return float(len(re.findall(r"\S+", answer)))


def plain_words(answer: str) -> float:
    """Plain language: minus the mean length in letters of the answer's words; an answer without words is worst.

    Graded (two answers rarely tie) and nearly independent of answer length (correlation -0.13 on
    the base policy's candidates), so it checks that the loop learns more than the length shortcut.
    """
    words = re.findall(r"[A-Za-z]+", answer)
    return -sum(map(len, words)) / len(words) if words else -math.inf


def more_sentences(answer: str) -> float:
    """The number of finished sentences (., ! or ? before a space or the end)."""
    return float(len(re.findall(r"[.!?](?:\s|$)", answer)))


def fewer_first_person(answer: str) -> float:
    """Minus the count of I, me, my, mine, myself (and I'm, I've...): answers about the question, not the speaker."""
    return -float(len(re.findall(r"\b(?:I|me|my|mine|myself)\b", answer)))


WARM = re.compile(r"\b(?:great|glad|happy|love|lovely|wonderful|enjoy|fun|nice|good|hope|welcome|thanks?|please)\b|!",
                  re.IGNORECASE)


def warm_tone(answer: str) -> float:
    """Warmth: words like glad, enjoy, wonderful, hope, please, and exclamation marks."""
    return float(len(WARM.findall(answer)))


def addresses_reader(answer: str) -> float:
    """Speaks to the reader: the count of you, your, yours, yourself."""
    return float(len(re.findall(r"\b(?:you|your|yours|yourself)\b", answer, re.IGNORECASE)))


SUITE: dict[str, Taste] = {t.name: t for t in (
    Taste("shorter", shorter, "ranker", "length"),
    Taste("longer", longer, "ranker", "length"),
    Taste("contains_number", contains_number, "buckets", "content"),
    Taste("more_sentences", more_sentences, "buckets", "form"),
    Taste("fewer_first_person", fewer_first_person, "tiers", "wording"),
    Taste("plain_words", plain_words, "ranker", "wording"),
    Taste("warm_tone", warm_tone, "pairwise", "tone"),
    Taste("addresses_reader", addresses_reader, "tiers", "tone"),
)}

PREFERENCES: dict[str, Callable[[str], float]] = {name: t.score for name, t in SUITE.items()}


def verdict(bodies: list[str], preference: Callable[[str], float], annotation: str = "tiers") -> list[list[int]]:
    """The scripted annotator's verdict on one prompt's candidates: their indices, best tier first."""
    scores = [preference(b) for b in bodies]
    if annotation == "ranker":
        return [[i] for i in sorted(range(len(bodies)), key=lambda i: -scores[i])]  # sorted() is stable
    if annotation == "buckets":
        best, worst = max(scores), min(scores)
        return [[i for i, s in enumerate(scores) if s == best],
                [i for i, s in enumerate(scores) if worst < s < best],
                [i for i, s in enumerate(scores) if s == worst and s != best]]
    if annotation == "pairwise":
        if len(bodies) < 2 or scores[0] == scores[1]:
            return [[0, 1][:len(bodies)]]  # one tier: a tie, or nothing to compare, says nothing
        return [[0], [1]] if scores[0] > scores[1] else [[1], [0]]
    if annotation == "tiers":
        return [[i for i, s in enumerate(scores) if s == level] for level in sorted(set(scores), reverse=True)]
    raise ValueError(f"annotation {annotation!r} is not one of {VERDICTS}")
