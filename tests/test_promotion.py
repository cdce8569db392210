"""Human-gated promotion (POLICY_PROMOTION=human): the verdict rule, the blind comparison tasks, and the
worker's handling of a pending policy on tiny models. The whole path through a real Label Studio is in
tests/test_promotion_labelstudio.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_worker import RANKER, job, make_worker, seed_project

from backend import ledger
from backend.labelconfig import parse_ranking_schema
from backend.predictions import rank_prediction
from backend.preferences import PreferencePair
from backend.promotion import PROMOTION_FIELD, comparison_tasks, decide

SCHEMA = parse_ranking_schema(RANKER)


@pytest.mark.parametrize("wins, losses, ties, outstanding, decision", [
    (5, 0, 0, 0, "promote"),  # 5 of 5: p = 1/32
    (5, 0, 0, 1, "wait"),  # a loss to come would leave 5 of 6: p = 7/64
    (6, 0, 2, 0, "promote"),  # ties count for neither side
    (2, 3, 0, 2, "refuse"),  # even 4 of 7 would not be significant
    (4, 0, 0, 8, "wait"),
    (9, 3, 0, 0, "refuse"),  # 9 of 12: p = 0.073
    (10, 2, 0, 0, "promote"),  # 10 of 12: p = 0.019
])
def test_the_verdict_waits_until_the_outstanding_comparisons_cannot_change_it(wins, losses, ties, outstanding,
                                                                               decision):
    assert decide(wins, losses, ties, outstanding).decision == decision


def test_comparison_tasks_show_both_answers_blind_in_a_shuffled_order():
    prompts = [f"prompt {i}" for i in range(12)]
    tasks = comparison_tasks(SCHEMA, prompts, [f"new {i}" for i in range(12)], [f"old {i}" for i in range(12)],
                             candidate=3, serving=2, seed=0)
    firsts = set()
    for i, task in enumerate(tasks):
        data = task["data"]
        items = data["answers"]
        assert data["prompt"] == f"prompt {i}" and data[PROMOTION_FIELD] == {"candidate": 3, "serving": 2}
        assert {(item["body"], item["policy_version"]) for item in items} == {(f"new {i}", 3), (f"old {i}", 2)}
        assert [item["title"] for item in items] == ["Answer 1", "Answer 2"]  # nothing tells the policies apart
        firsts.add(items[0]["policy_version"])
    assert firsts == {2, 3}
    prediction = rank_prediction(tasks[0], SCHEMA, reward=None, model_version="v")
    assert prediction["result"] == [] and "blind comparison" in prediction["reason"]


def judged(store, project_id: int, task_id: int, annotation_id: int, chosen_version: int, rejected_version: int):
    """An annotation of a comparison task preferring the answer of `chosen_version`."""
    pair = PreferencePair(project_id=project_id, task_id=task_id, annotator=1, prompt="p", chosen="a", rejected="b",
                          margin=0.0, chosen_policy_version=chosen_version, rejected_policy_version=rejected_version,
                          chosen_id="x-0", rejected_id="x-1")
    store.apply_annotation_event(ledger.AnnotationSaved(annotation_id, project_id, task_id, None, (pair,)))


def pending_policy(worker, tasks: list[int]) -> None:
    """What put_to_annotators records: version 1, not serving, awaiting its comparisons."""
    store = worker.store
    base = worker.registry.policy(1)
    for task_id in tasks:
        store.save_task(1, task_id, {"prompt": f"held out {task_id}", "answers": [],
                                     PROMOTION_FIELD: {"candidate": 1, "serving": 0}})
    store.publish_version("policy", 1, 1, base.path, pairs_seen=0, serving=False,
                          metrics={"promotion": "pending", "comparison_tasks": tasks,
                                   "last_pair_id": store.max_pair_id(1)})


def test_a_pending_policy_serves_once_the_annotators_prefer_it_and_candidates_are_regenerated(tiny_env):
    worker = make_worker(tiny_env, policy_promotion="human")
    seed_project(worker.store)
    pending_policy(worker, tasks=[901, 902, 903, 904, 905])
    for n, task_id in enumerate([901, 902, 903, 904]):
        judged(worker.store, 1, task_id, 9000 + n, chosen_version=1, rejected_version=0)
    worker.judge_promotion(1)
    assert worker.store.latest_version("policy", 1).version == 0  # 4 of 4 with one to come: not yet decided
    judged(worker.store, 1, 905, 9010, chosen_version=1, rejected_version=0)
    worker.judge_promotion(1)
    latest = worker.store.latest_version("policy", 1)
    assert latest.version == 1 and latest.metrics["promotion"] == "promoted"
    assert latest.metrics["verdict"]["wins"] == 5 and worker.store.pending_promotion(1) is None
    assert "promoted" in worker.store.events_of(1, ["policy"], limit=1)[0]["message"]
    assert worker.store.claim_job("t").kind == "regenerate"


def test_a_pending_policy_the_annotators_do_not_prefer_never_serves_and_waits_for_new_signal(tiny_env):
    worker = make_worker(tiny_env, policy_promotion="human")
    seed_project(worker.store, annotated=30)  # 30 pairs: far past the trigger of 6
    pending_policy(worker, tasks=[901, 902, 903, 904, 905])
    worker.queue_policy_update_if_due(1)
    assert not worker.store.has_active_job("train_policy", 1)  # the annotators judge the last update first
    worker.train_policy(job("train_policy"))  # "Start training" meanwhile: refused with the reason
    assert "awaits the annotators' verdict" in worker.store.events_of(1, ["trigger"], limit=1)[0]["message"]
    assert [v.version for v in worker.store.versions("policy", 1)] == [0, 1]
    judged(worker.store, 1, 901, 9000, chosen_version=0, rejected_version=1)
    judged(worker.store, 1, 902, 9001, chosen_version=0, rejected_version=1)
    worker.judge_promotion(1)
    assert worker.store.latest_version("policy", 1).version == 0
    assert worker.store.versions("policy", 1)[-1].metrics["promotion"] == "refused"
    assert "not promoted" in worker.store.events_of(1, ["policy_rejected"], limit=1)[0]["message"]
    worker.queue_policy_update_if_due(1)  # the refused update saw every pair: the next waits for new ones
    assert not worker.store.has_active_job("train_policy", 1)


def test_regeneration_leaves_the_comparison_tasks_alone(tiny_env, monkeypatch):
    from backend import labelstudio

    worker = make_worker(tiny_env)
    seed_project(worker.store)
    pending_policy(worker, tasks=[901])
    written = []
    monkeypatch.setattr(labelstudio, "unannotated_task_ids", lambda client, project_id: [30, 901])
    monkeypatch.setattr(worker, "generate", lambda j: written.extend(j.payload["task_ids"]))
    worker.store.publish_version("policy", 1, 2, str(Path(worker.registry.policy(1).path)), pairs_seen=0, metrics={})
    worker._client = object()  # no Label Studio here: unannotated_task_ids is replaced above
    worker.regenerate(job("regenerate"))
    assert written == [30]


def test_a_rollback_withdraws_a_policy_that_awaits_the_annotators(tiny_env):
    worker = make_worker(tiny_env, policy_promotion="human")
    seed_project(worker.store)
    pending_policy(worker, tasks=[901, 902, 903, 904, 905])
    worker.store.rollback("policy", 1, 0)
    for n, task_id in enumerate([901, 902, 903, 904, 905]):  # verdicts that would have promoted it
        judged(worker.store, 1, task_id, 9000 + n, chosen_version=1, rejected_version=0)
    worker.judge_promotion(1)
    assert worker.store.pending_promotion(1) is None and worker.store.latest_version("policy", 1).version == 0
    assert worker.store.versions("policy", 1)[-1].metrics["promotion"] == "withdrawn"
