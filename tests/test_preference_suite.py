"""The preference suite's scripted annotators (bench/preference_suite.py): each taste's score and verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from preference_suite import SUITE, VERDICTS, verdict  # noqa: E402

from backend.preferences import pairs_from_tiers  # noqa: E402

TERSE, CHATTY = "12 legs.", "I am glad you asked! You will love this: my answer is that spiders have legs. Enjoy."


@pytest.mark.parametrize("name, preferred, other", [
    ("shorter", TERSE, CHATTY), ("longer", CHATTY, TERSE), ("contains_number", TERSE, CHATTY),
    ("more_sentences", CHATTY, "no sentence ends here"), ("fewer_first_person", TERSE, CHATTY),
    ("plain_words", "A cat is a pet.", "Photosynthesis transforms illumination."),
    ("warm_tone", CHATTY, TERSE), ("addresses_reader", CHATTY, TERSE),
])
def test_each_taste_prefers_the_answer_with_its_feature(name, preferred, other):
    taste = SUITE[name]
    assert taste.score(preferred) > taste.score(other)


def test_the_suite_covers_eight_tastes_in_every_verdict_format_and_both_length_directions():
    assert len(SUITE) >= 8
    assert {t.verdict for t in SUITE.values()} == set(VERDICTS)
    assert {"shorter", "longer"} <= set(SUITE)
    assert {"length", "content", "form", "tone", "wording"} <= {t.about for t in SUITE.values()}


def test_a_pairwise_annotator_judges_only_the_first_two_candidates_and_a_tie_gives_no_pair():
    score = SUITE["shorter"].score
    assert verdict(["long answer", "short", "s"], score, "pairwise") == [[1], [0]]
    assert list(pairs_from_tiers(verdict(["same", "same", "x"], score, "pairwise"))) == []


def test_buckets_put_equal_best_answers_together_and_leave_no_pair_between_them():
    score = SUITE["contains_number"].score
    tiers = verdict(["1", "2", "none"], score, "buckets")
    assert tiers == [[0, 1], [], [2]]
    assert sorted(pairs_from_tiers(tiers)) == [(0, 2), (1, 2)]


def test_an_unknown_verdict_format_names_the_formats():
    with pytest.raises(ValueError, match="pairwise"):
        verdict(["a", "b"], SUITE["shorter"].score, "stars")
