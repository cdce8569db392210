"""Human-gated promotion through a real Label Studio: a policy past the automatic checks becomes blind
comparison tasks in the project; the annotators' rankings, read back from Label Studio, promote it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_two_workers import seed
from test_worker import RANKER

from backend.local_servers import TOKEN
from backend.promotion import PROMOTION_FIELD
from backend.settings import load_settings
from backend.store import Job, Store
from backend.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.labelstudio


def prefer(version: int, data: dict) -> list[dict]:
    """A ranking that puts the answer of policy `version` first."""
    items = sorted(data["answers"], key=lambda item: item["policy_version"] != version)
    return [{"from_name": "rank", "to_name": "answers", "type": "ranker",
             "value": {"ranker": {"rank": [item["id"] for item in items]}}}]


def test_annotators_promote_a_policy_they_prefer_in_blind_comparisons_in_label_studio(tiny_env, label_studio,
                                                                                        ls_client):
    env = {**tiny_env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "POLICY_PROMOTION": "human", "PROMOTION_COMPARISONS": "5"}
    settings = load_settings(env)
    store = Store(settings.store_url)
    store.create_schema()
    project = ls_client.projects.create(title="promotion", label_config=RANKER)
    seed(store, project.id)  # 30 prompts with candidates, 12 ranked
    worker = Worker(settings, store)
    worker.fit_reward(Job(0, "fit_reward", project.id, {}))
    worker.train_policy(Job(0, "train_policy", project.id, {}))

    # v1 passed tiny_env's lenient checks: it waits for the annotators while v0 keeps serving
    assert store.latest_version("policy", project.id).version == 0
    assert store.pending_promotion(project.id).version == 1
    tasks = [t for t in ls_client.tasks.list(project=project.id) if PROMOTION_FIELD in t.data]
    assert len(tasks) == 5 and all(t.data[PROMOTION_FIELD] == {"candidate": 1, "serving": 0} for t in tasks)
    assert all({item["policy_version"] for item in t.data["answers"]} == {0, 1} for t in tasks)

    for task in tasks[:4]:
        ls_client.annotations.create(id=task.id, result=prefer(1, task.data))
    worker.sync(Job(0, "sync", project.id, {}))  # the rankings, read back from Label Studio
    worker.fit_reward(Job(0, "fit_reward", project.id, {}))
    assert store.latest_version("policy", project.id).version == 0  # 4 of 4, one outstanding: not decided

    ls_client.annotations.create(id=tasks[4].id, result=prefer(1, tasks[4].data))
    worker.sync(Job(0, "sync", project.id, {}))
    worker.fit_reward(Job(0, "fit_reward", project.id, {}))
    latest = store.latest_version("policy", project.id)
    assert latest.version == 1 and latest.metrics["verdict"]["wins"] == 5
    # the comparisons are preference pairs like any other: the reward model learns from them too
    assert {(p.chosen_policy_version, p.rejected_policy_version) for p in store.pairs(project.id)
            if p.task_id in {t.id for t in tasks}} == {(1, 0)}
