import pytest

from backend.labelconfig import LabelConfigError, parse_ranking_schema
from backend.preferences import AnnotationError, annotation_pairs, pairs_from_tiers

RANKER = '<View><Text name="q" value="$question"/><List name="cands" value="$items"/><Ranker name="order" toName="cands"/></View>'
BUCKETS = ('<View><Text name="q" value="$question"/><List name="cands" value="$items"/>'
           '<Ranker name="order" toName="cands"><Bucket name="good"/><Bucket name="ok"/><Bucket name="bad"/></Ranker></View>')


def task(n: int = 4) -> dict:
    return {"id": 7, "data": {"question": "Q?", "items": [{"id": f"c{i}", "body": f"answer {i}", "policy_version": i % 2}
                                                       for i in range(n)]}}


def ranking(value: dict, cancelled: bool = False) -> dict:
    return {"id": 1, "completed_by": 3, "was_cancelled": cancelled,
            "result": [{"from_name": "order", "to_name": "cands", "type": "ranker", "value": {"ranker": value}}]}


def test_schema_uses_the_users_tag_and_field_names():
    schema = parse_ranking_schema(RANKER)
    assert (schema.prompt_field, schema.candidates_field, schema.list_name, schema.ranker_name) == (
        "question", "items", "cands", "order")


def test_schema_without_list_is_refused_with_the_fix():
    with pytest.raises(LabelConfigError, match="templates/ranker.xml"):
        parse_ranking_schema('<View><Text name="q" value="$q"/></View>')


def test_full_ranking_of_k_gives_k_choose_2_pairs_in_order():
    pairs = annotation_pairs(ranking({"order": ["c2", "c0", "c3", "c1"]}), task(), parse_ranking_schema(RANKER), 1)
    assert len(pairs) == 6
    assert [(p.chosen, p.rejected) for p in pairs][:3] == [("answer 2", "answer 0"), ("answer 2", "answer 3"),
                                                           ("answer 2", "answer 1")]
    assert pairs[0].chosen_policy_version == 0 and pairs[0].rejected_policy_version == 0
    assert pairs[0].annotator == 3 and pairs[0].prompt == "Q?" and pairs[0].task_id == 7


def test_buckets_pair_across_buckets_and_skip_ties_and_unsorted():
    value = {"good": ["c0"], "ok": ["c1", "c2"], "bad": [], "_": ["c3"]}
    pairs = annotation_pairs(ranking(value), task(), parse_ranking_schema(BUCKETS), 1)
    assert {(p.chosen, p.rejected) for p in pairs} == {("answer 0", "answer 1"), ("answer 0", "answer 2")}


def test_cancelled_annotation_gives_no_pairs():
    assert annotation_pairs(ranking({"order": ["c0", "c1"]}, cancelled=True), task(), parse_ranking_schema(RANKER), 1) == []


def test_ranking_a_missing_candidate_is_refused():
    with pytest.raises(AnnotationError, match="c8"):
        annotation_pairs(ranking({"order": ["c0", "c8"]}), task(), parse_ranking_schema(RANKER), 1)


def test_pairs_from_tiers_never_pairs_within_a_tier():
    assert pairs_from_tiers([["a", "b"], ["c"]]) == [("a", "c"), ("b", "c")]
