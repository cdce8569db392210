"""The ledger: any order or repetition of annotation events ends in the same live pairs as a simple model."""

from datetime import UTC, datetime, timedelta

import pytest
from conftest import payload
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.labelconfig import parse_ranking_schema
from backend.ledger import (
    AnnotationSaved,
    AnnotationsDeleted,
    accepts,
    apply,
    exported_saves,
    live_pairs,
    parse_time,
    replay,
    saved_event,
    sync_events,
)
from backend.preferences import annotation_pairs

CANDIDATES = ["c0", "c1", "c2", "c3"]
RANKER = '<View><Text name="q" value="$q"/><List name="items" value="$items"/><Ranker name="rank" toName="items"/></View>'
BUCKETS = ('<View><Text name="q" value="$q"/><List name="items" value="$items"/><Ranker name="rank" toName="items">'
           '<Bucket name="good"/><Bucket name="acceptable"/><Bucket name="bad"/></Ranker></View>')
RATING = ('<View><Text name="q" value="$q"/>' + "".join(
    f'<Text name="t{i}" value="$a{i}"/><Rating name="r{i}" toName="t{i}" maxRating="5"/>' for i in range(4)) + "</View>")
SCHEMAS = {name: parse_ranking_schema(xml) for name, xml in [("ranker", RANKER), ("buckets", BUCKETS), ("rating", RATING)]}
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def task(schema, task_id: int = 1) -> dict:
    items = [{"id": c, "title": c, "body": f"body of {c}", "policy_version": i} for i, c in enumerate(CANDIDATES)]
    return {"id": task_id, "data": {"q": "Q?", **schema.candidate_data(items)}}


def ranker_result(value: dict) -> list[dict]:
    return [{"from_name": "rank", "to_name": "items", "type": "ranker", "value": {"ranker": value}}]


def rating_result(ratings: dict[int, int]) -> list[dict]:
    return [{"from_name": f"r{i}", "to_name": f"t{i}", "type": "rating", "value": {"rating": r}} for i, r in ratings.items()]


# --- strategies: a judgement in one of the formats, then versions and deletes of a few annotations ---

rankings = st.permutations(CANDIDATES).flatmap(lambda p: st.integers(0, 4).map(lambda k: list(p[:k])))
buckets = st.lists(st.sampled_from(["good", "acceptable", "bad", "_"]), min_size=4, max_size=4)
ratings = st.dictionaries(st.integers(0, 3), st.integers(1, 5))
judgements = st.one_of(
    rankings.map(lambda order: ("ranker", ranker_result({"rank": order}))),
    buckets.map(lambda where: ("buckets", ranker_result(
        {b: [c for c, w in zip(CANDIDATES, where) if w == b] for b in ["good", "acceptable", "bad", "_"]}))),
    ratings.map(lambda r: ("rating", rating_result(r))),
)


@st.composite
def histories(draw):
    """Versions (distinct stamps) and maybe a delete for each of a few annotations, by two annotators on two tasks."""
    events, expected = [], {}
    stamps = iter(draw(st.permutations(range(40))))
    for annotation_id in range(1, draw(st.integers(1, 4)) + 1):
        task_id, annotator = draw(st.sampled_from([(1, 7), (1, 8), (2, 7)]))
        versions = []
        for _ in range(draw(st.integers(1, 3))):
            kind, result = draw(judgements)
            schema = SCHEMAS[kind]
            annotation = {"id": annotation_id, "completed_by": annotator, "result": result,
                          "was_cancelled": draw(st.booleans()) and draw(st.booleans()),
                          "updated_at": (T0 + timedelta(seconds=next(stamps))).isoformat()}
            versions.append(saved_event(annotation, task(schema, task_id), schema, project_id=3))
        events += versions
        deleted = draw(st.booleans())
        if deleted:
            events.append(AnnotationsDeleted((annotation_id,), 3))
        else:
            expected[annotation_id] = max(versions, key=lambda v: v.updated_at).pairs
    return events, expected


@st.composite
def deliveries(draw, events):
    """The same events, each delivered at least once, in any order."""
    repeated = events + draw(st.lists(st.sampled_from(events), max_size=len(events)))
    return draw(st.permutations(repeated))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_delivery_order_with_repeats_ends_in_the_models_live_pairs(data):
    events, expected = data.draw(histories())
    state = replay(data.draw(deliveries(events)))
    assert live_pairs(state) == [p for a in sorted(expected) for p in expected[a]]
    assert replay(data.draw(deliveries(events))) == state


@settings(max_examples=150, deadline=None)
@given(rankings)
def test_a_ranking_of_k_gives_k_choose_2_pairs_each_following_the_order(order):
    pairs = annotation_pairs({"id": 1, "result": ranker_result({"rank": order})}, task(SCHEMAS["ranker"]),
                             SCHEMAS["ranker"], 3)
    assert len(pairs) == len(order) * (len(order) - 1) // 2
    assert all(order.index(p.chosen_id) < order.index(p.rejected_id) for p in pairs)


@settings(max_examples=150, deadline=None)
@given(buckets)
def test_buckets_pair_exactly_the_candidates_of_different_sorted_buckets(where):
    value = {b: [c for c, w in zip(CANDIDATES, where) if w == b] for b in ["good", "acceptable", "bad", "_"]}
    pairs = annotation_pairs({"id": 1, "result": ranker_result(value)}, task(SCHEMAS["buckets"]), SCHEMAS["buckets"], 3)
    rank = {"good": 0, "acceptable": 1, "bad": 2}
    expected = {(a, b) for a, wa in zip(CANDIDATES, where) for b, wb in zip(CANDIDATES, where)
                if wa in rank and wb in rank and rank[wa] < rank[wb]}
    assert {(p.chosen_id, p.rejected_id) for p in pairs} == expected and len(pairs) == len(expected)


@settings(max_examples=150, deadline=None)
@given(ratings)
def test_ratings_pair_every_two_different_ratings_with_their_gap_as_margin(given_ratings):
    pairs = annotation_pairs({"id": 1, "result": rating_result(given_ratings)}, task(SCHEMAS["rating"]),
                             SCHEMAS["rating"], 3)
    rated = {f"c{i}": r for i, r in given_ratings.items()}
    expected = {(a, b, float(ra - rb)) for a, ra in rated.items() for b, rb in rated.items() if ra > rb}
    assert {(p.chosen_id, p.rejected_id, p.margin) for p in pairs} == expected and len(pairs) == len(expected)


# --- the rules one at a time ---

def save(annotation_id: int, second: int, order: list[str], task_id: int = 1, annotator: int = 7) -> AnnotationSaved:
    annotation = {"id": annotation_id, "completed_by": annotator, "result": ranker_result({"rank": order}),
                  "updated_at": (T0 + timedelta(seconds=second)).isoformat()}
    return saved_event(annotation, task(SCHEMAS["ranker"], task_id), SCHEMAS["ranker"], project_id=3)


def ids(state) -> list[tuple[str, str]]:
    return [(p.chosen_id, p.rejected_id) for p in live_pairs(state)]


def test_update_replaces_the_annotations_pairs():
    assert ids(replay([save(1, 0, ["c0", "c1"]), save(1, 5, ["c1", "c0"])])) == [("c1", "c0")]


def test_an_older_version_arriving_late_is_ignored():
    assert ids(replay([save(1, 5, ["c1", "c0"]), save(1, 0, ["c0", "c1"])])) == [("c1", "c0")]


def test_delete_wins_over_a_create_that_arrives_after_it():
    state = replay([AnnotationsDeleted((1,), 3), save(1, 99, ["c0", "c1"])])
    assert live_pairs(state) == [] and state[1].deleted


def test_annotations_of_several_annotators_on_one_task_are_all_kept():
    state = replay([save(1, 0, ["c0", "c1"], annotator=7), save(2, 0, ["c1", "c0"], annotator=8)])
    assert [(p.annotator, p.chosen_id) for p in live_pairs(state)] == [(7, "c0"), (8, "c1")]


def test_a_refused_update_removes_the_older_pairs_and_keeps_the_reason():
    bad = save(1, 5, ["c0", "c9"])
    state = replay([save(1, 0, ["c0", "c1"]), bad])
    assert bad.refused and "c9" in state[1].refused and live_pairs(state) == []


def test_equal_stamps_with_different_content_pick_the_same_winner_in_either_order():
    first, second = save(1, 0, ["c0", "c1"]), save(1, 0, ["c1", "c0"])
    assert replay([first, second]) == replay([second, first])
    assert not accepts(replay([first])[1], first)


def test_apply_leaves_the_given_state_unchanged():
    state = replay([save(1, 0, ["c0", "c1"])])
    apply(state, AnnotationsDeleted((1,), 3))
    assert not state[1].deleted


def test_captured_update_payload_replaces_the_created_one():
    created, updated = payload("webhook_ANNOTATION_CREATED_ranker"), payload("webhook_ANNOTATION_UPDATED_ranker")
    schema = parse_ranking_schema(created["project"]["label_config"])
    events = [saved_event(b["annotation"], b["task"], schema, b["project"]["id"]) for b in (updated, created)]
    state = replay(events)
    assert state[1].updated_at == parse_time(updated["annotation"]["updated_at"]) and len(live_pairs(state)) == 3


def test_sync_deletes_what_the_export_lacks_and_keeps_what_it_has():
    state = replay([save(1, 0, ["c0", "c1"]), save(2, 0, ["c1", "c0"], annotator=8)])
    export = [{**task(SCHEMAS["ranker"]), "annotations": [
        {"id": 1, "completed_by": 7, "result": ranker_result({"rank": ["c0", "c1"]}),
         "updated_at": T0.isoformat()}]}]
    events = sync_events(state, exported_saves(export, SCHEMAS["ranker"], 3), project_id=3)
    assert events[-1] == AnnotationsDeleted((2,), 3)
    assert replay(events, state)[1] == state[1] and ids(replay(events, state)) == [("c0", "c1")]


def test_sync_leaves_other_projects_alone():
    state = replay([save(1, 0, ["c0", "c1"])])
    assert sync_events(state, [], project_id=4) == []


def test_a_stamp_that_is_not_iso_8601_is_refused():
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_sync_against_the_state_before_the_export_keeps_annotations_created_meanwhile():
    before = replay([save(1, 0, ["c0", "c1"])])
    export_events = sync_events(before, [save(1, 0, ["c0", "c1"])], project_id=3)
    after = replay(export_events, replay([save(2, 9, ["c1", "c0"], annotator=8)], before))
    assert ids(after) == [("c0", "c1"), ("c1", "c0")]
