import pytest
from conftest import payload

from backend import labelconfig
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


# --- the other formats: pairwise, best-of-n, rating ---

PAIRWISE_CONFIG = ('<View><Text name="question" value="$q"/><Pairwise name="which" toName="one,two"/>'
                   '<Text name="one" value="$first"/><Text name="two" value="$second"/></View>')
RATING_CONFIG = ('<View><Text name="question" value="$q"/>'
                 + "".join(f'<Text name="t{i}" value="$a{i}"/><Rating name="stars{i}" toName="t{i}" maxRating="5"/>'
                           for i in range(3)) + "</View>")
BEST_CONFIG = ('<View><Text name="question" value="$q"/>' + "".join(f'<Text name="t{i}" value="$a{i}"/>' for i in range(3))
               + '<Choices name="pick" toName="question" choice="single">'
               + "".join(f'<Choice value="Answer {i}" alias="t{i}"/>' for i in range(3))
               + '<Choice value="All equal" alias="same"/></Choices></View>')


def flat_task(schema, bodies=("zero", "one", "two")) -> dict:
    items = [{"id": f"c{i}", "title": "", "body": b, "policy_version": 5} for i, b in enumerate(bodies)]
    return {"id": 9, "data": {"q": "Q?", **schema.candidate_data(items)}}


def annotation(*results, annotation_id: int = 11) -> dict:
    return {"id": annotation_id, "completed_by": 4, "was_cancelled": False, "result": list(results)}


def stars(i: int, rating) -> dict:
    return {"from_name": f"stars{i}", "to_name": f"t{i}", "type": "rating", "value": {"rating": rating}}


def test_schema_recognises_each_format_by_its_tags():
    assert parse_ranking_schema(BUCKETS).kind == labelconfig.BUCKETS
    pairwise = parse_ranking_schema(PAIRWISE_CONFIG)
    assert (pairwise.kind, pairwise.prompt_field, [s.field for s in pairwise.slots]) == (labelconfig.PAIRWISE, "q", ["first", "second"])
    rating = parse_ranking_schema(RATING_CONFIG)
    assert (rating.kind, [s.rating_name for s in rating.slots], rating.slots[0].max_rating) == (
        labelconfig.RATING, ["stars0", "stars1", "stars2"], 5)
    best = parse_ranking_schema(BEST_CONFIG)
    assert (best.kind, best.prompt_field, dict(best.choices)["t1"], dict(best.choices)["same"]) == (
        labelconfig.BEST_OF_N, "q", "t1", None)


def test_candidate_data_writes_the_list_and_each_slots_text_with_empty_placeholders():
    schema = parse_ranking_schema(PAIRWISE_CONFIG)
    assert schema.candidate_data([{"id": "c0", "body": "x"}]) == {"answers": [{"id": "c0", "body": "x"}],
                                                                  "first": "x", "second": ""}
    assert schema.candidate_data([]) == {"answers": [], "first": "", "second": ""}
    assert parse_ranking_schema(RANKER).candidate_data([]) == {"items": []}


def test_pairwise_selected_side_is_chosen_with_ids_and_policy_versions():
    schema = parse_ranking_schema(PAIRWISE_CONFIG)
    result = {"from_name": "which", "to_name": "which", "type": "pairwise", "value": {"selected": "right"}}
    [pair] = annotation_pairs(annotation(result), flat_task(schema), schema, 2)
    assert (pair.chosen, pair.rejected, pair.chosen_id, pair.rejected_id) == ("one", "zero", "c1", "c0")
    assert (pair.chosen_policy_version, pair.annotation_id, pair.annotator, pair.prompt) == (5, 11, 4, "Q?")


def test_pairwise_side_other_than_left_or_right_is_refused():
    schema = parse_ranking_schema(PAIRWISE_CONFIG)
    result = {"from_name": "which", "to_name": "which", "type": "pairwise", "value": {"selected": "middle"}}
    with pytest.raises(AnnotationError, match="middle"):
        annotation_pairs(annotation(result), flat_task(schema), schema, 2)


def test_shown_text_wins_over_a_stale_candidate_list_and_loses_its_policy_version():
    schema = parse_ranking_schema(PAIRWISE_CONFIG)
    task = flat_task(schema)
    task["data"]["first"] = "edited in Label Studio"
    result = {"from_name": "which", "to_name": "which", "type": "pairwise", "value": {"selected": "left"}}
    [pair] = annotation_pairs(annotation(result), task, schema, 2)
    assert (pair.chosen, pair.chosen_id, pair.chosen_policy_version) == ("edited in Label Studio", "one", None)


def test_best_of_n_pick_beats_every_other_shown_candidate():
    schema = parse_ranking_schema(BEST_CONFIG)
    result = {"from_name": "pick", "to_name": "question", "type": "choices", "value": {"choices": ["t2"]}}
    pairs = annotation_pairs(annotation(result), flat_task(schema), schema, 2)
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("two", "one"), ("two", "zero")]


def test_best_of_n_accepts_the_choice_value_as_well_as_its_alias():
    schema = parse_ranking_schema(BEST_CONFIG)
    result = {"from_name": "pick", "to_name": "question", "type": "choices", "value": {"choices": ["Answer 0"]}}
    assert {p.chosen for p in annotation_pairs(annotation(result), flat_task(schema), schema, 2)} == {"zero"}


def test_best_of_n_no_preference_choice_gives_no_pairs_and_unknown_choice_is_refused():
    schema = parse_ranking_schema(BEST_CONFIG)
    same = {"from_name": "pick", "to_name": "question", "type": "choices", "value": {"choices": ["same"]}}
    assert annotation_pairs(annotation(same), flat_task(schema), schema, 2) == []
    bogus = {"from_name": "pick", "to_name": "question", "type": "choices", "value": {"choices": ["t7"]}}
    with pytest.raises(AnnotationError, match="t7"):
        annotation_pairs(annotation(bogus), flat_task(schema), schema, 2)


def test_rating_pairs_every_two_differently_rated_candidates_with_the_gap_as_margin():
    schema = parse_ranking_schema(RATING_CONFIG)
    pairs = annotation_pairs(annotation(stars(0, 2), stars(1, 5), stars(2, 2)), flat_task(schema), schema, 2)
    assert sorted((p.chosen, p.rejected, p.margin) for p in pairs) == [("one", "two", 3.0), ("one", "zero", 3.0)]


def test_rating_leaves_unrated_candidates_out():
    schema = parse_ranking_schema(RATING_CONFIG)
    [pair] = annotation_pairs(annotation(stars(0, 1), stars(2, 4)), flat_task(schema), schema, 2)
    assert (pair.chosen, pair.rejected, pair.margin) == ("two", "zero", 3.0)


@pytest.mark.parametrize("rating", [0, 6, "5", True, None])
def test_rating_outside_its_scale_is_refused(rating):
    schema = parse_ranking_schema(RATING_CONFIG)
    with pytest.raises(AnnotationError, match="1..5"):
        annotation_pairs(annotation(stars(0, rating), stars(1, 3)), flat_task(schema), schema, 2)


def test_rating_a_candidate_the_task_does_not_show_is_refused():
    schema = parse_ranking_schema(RATING_CONFIG)
    task = flat_task(schema)
    del task["data"]["a2"]
    with pytest.raises(AnnotationError, match="t2"):
        annotation_pairs(annotation(stars(0, 1), stars(2, 4)), task, schema, 2)


def test_identical_candidate_texts_give_no_pair():
    pairs = annotation_pairs(ranking({"order": ["c0", "c1", "c2"]}),
                             {"id": 7, "data": {"question": "Q", "items": [{"id": f"c{i}", "body": b}
                                                                          for i, b in enumerate("xxy")]}},
                             parse_ranking_schema(RANKER), 1)
    assert [(p.chosen, p.rejected) for p in pairs] == [("x", "y"), ("x", "y")]


def test_a_candidate_ranked_twice_is_refused():
    with pytest.raises(AnnotationError, match="twice"):
        annotation_pairs(ranking({"good": ["c0"], "ok": ["c0"], "bad": ["c1"]}), task(), parse_ranking_schema(BUCKETS), 1)


def test_two_results_for_one_ranker_are_refused():
    double = ranking({"order": ["c0", "c1"]})
    double["result"] *= 2
    with pytest.raises(AnnotationError, match="2 results"):
        annotation_pairs(double, task(), parse_ranking_schema(RANKER), 1)


def test_results_of_other_controls_are_ignored():
    note = {"from_name": "comment", "to_name": "q", "type": "textarea", "value": {"text": ["meh"]}}
    ann = ranking({"order": ["c1", "c0"]})
    ann["result"].append(note)
    assert len(annotation_pairs(ann, task(), parse_ranking_schema(RANKER), 1)) == 1


def test_store_row_fills_every_pair_column_of_the_store():
    from backend.store import PairRow

    [pair] = annotation_pairs(ranking({"order": ["c1", "c0"]}), task(), parse_ranking_schema(RANKER), 1)
    columns = {c.name for c in PairRow.__table__.columns} - {"id", "created_at"}
    assert set(pair.as_row()) == columns
    assert (pair.as_row()["chosen_id"], pair.as_row()["annotation_id"]) == ("c1", 1)


@pytest.mark.parametrize("name, expected", [
    ("webhook_ANNOTATION_CREATED_pairwise", [("0", "1")]),  # "left" is answer1
    ("webhook_ANNOTATION_CREATED_choices", [("0", "1")]),  # "A" is the first candidate by position
    ("webhook_ANNOTATION_CREATED_ranker", [("0", "I think 0"), ("0", "1"), ("I think 0", "1")]),
])
def test_captured_label_studio_payloads_give_their_pairs(name, expected):
    body = payload(name)
    schema = parse_ranking_schema(body["project"]["label_config"])
    pairs = annotation_pairs(body["annotation"], body["task"], schema, body["project"]["id"])
    assert [(p.chosen, p.rejected) for p in pairs] == expected
