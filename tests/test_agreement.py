from types import SimpleNamespace

from backend.agreement import Agreement, annotator_consistency, orders, pairwise_agreement


def ranked(annotator: int, order: str, task: int = 1) -> list[dict]:
    """The pairs of a full ranking, e.g. "abc" = a > b > c, by candidate id."""
    return [{"task_id": task, "annotator": annotator, "chosen_id": a, "rejected_id": b, "chosen": a.upper(),
             "rejected": b.upper()} for i, a in enumerate(order) for b in order[i + 1:]]


def test_identical_rankings_agree_fully():
    assert pairwise_agreement(ranked(1, "abc") + ranked(2, "abc")) == Agreement(rate=1.0, compared=3)


def test_one_swapped_pair_of_three_lowers_agreement_to_two_thirds():
    assert pairwise_agreement(ranked(1, "abc") + ranked(2, "acb")) == Agreement(rate=2 / 3, compared=3)


def test_pairs_only_one_annotator_expressed_are_not_compared():
    # annotator 2 tied b and c (no pair), so only (a,b) and (a,c) compare
    tied = [p for p in ranked(2, "abc") if {p["chosen_id"], p["rejected_id"]} != {"b", "c"}]
    assert pairwise_agreement(ranked(1, "acb") + tied) == Agreement(rate=1.0, compared=2)


def test_different_tasks_are_never_compared():
    assert pairwise_agreement(ranked(1, "abc", task=1) + ranked(2, "cba", task=2)) == Agreement(rate=None, compared=0)


def test_candidates_without_ids_are_told_apart_by_text():
    rows = [SimpleNamespace(task_id=1, annotator=a, chosen=c, rejected=r) for a, c, r in [(1, "x", "y"), (2, "y", "x")]]
    assert pairwise_agreement(rows) == Agreement(rate=0.0, compared=1)


def test_an_annotator_contradicting_themself_on_a_task_has_no_order_for_that_pair():
    assert orders(ranked(1, "ab") + ranked(1, "ba"))[1][1] == {}


def test_consistency_scores_each_annotator_against_the_majority_of_the_others():
    scores = annotator_consistency(ranked(1, "abc") + ranked(2, "abc") + ranked(3, "abc") + ranked(4, "cba"))
    assert scores == {1: Agreement(rate=1.0, compared=3), 2: Agreement(rate=1.0, compared=3),
                      3: Agreement(rate=1.0, compared=3), 4: Agreement(rate=0.0, compared=3)}


def test_consistency_skips_pairs_where_the_others_split_evenly():
    # for 1 (and 2) the others split 1-1 on (a, b): nothing to score; 3 stands against two
    assert annotator_consistency(ranked(1, "ab") + ranked(2, "ab") + ranked(3, "ba")) == {
        3: Agreement(rate=0.0, compared=1)}
