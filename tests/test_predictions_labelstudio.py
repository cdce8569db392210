"""Predictions in a real Label Studio follow the reward model: after annotators rank candidates in the
opposite order, the next predictions (asked for because model_version changed) reorder to match."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from backend.local_servers import TOKEN, start_backend
from backend.reward import is_held_out

pytestmark = pytest.mark.labelstudio
ROOT = Path(__file__).resolve().parents[1]
# training prompts only: a held-out prompt's pairs never reach the reward model, by design
PROMPTS = [p for p in (f"Which city should I visit in spring, number {i}?" for i in range(40)) if not is_held_out(p)][:8]


def predicted_orders(ls_client, project_id: int) -> dict[int, tuple[str, list[str]]]:
    """task id -> (model_version, ranked candidate ids) of its newest prediction."""
    orders = {}
    for prediction in sorted(ls_client.predictions.list(project=project_id), key=lambda p: p.id):
        ranker = prediction.result[0]["value"]["ranker"]
        orders[prediction.task] = (prediction.model_version, ranker["rank"])
    return orders


def retrieve_predictions(ls_client, project_id: int) -> None:
    ls_client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                             selected_items={"all": True, "excluded": []})


def test_predictions_reorder_after_annotations_change_the_reward_models_mind(tiny_env, label_studio, ls_client):
    env = {**tiny_env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "PPO_TRIGGER_PAIRS": "1000000"}
    backend = start_backend(env)
    try:
        project = ls_client.projects.create(title="predictions follow the reward model",
                                            label_config=(ROOT / "templates/ranker.xml").read_text())
        ls_client.ml.create(project=project.id, url=backend.url, title="rlhf", is_interactive=False)
        bodies = ["Visit Paris in spring.", "Try London, it rains less than you think.", "Berlin has great museums."]
        ls_client.projects.import_tasks(id=project.id, request=[{"data": {"prompt": p, "answers": [
            {"id": f"c{i}", "title": f"Answer {i}", "body": b} for i, b in enumerate(bodies)]}} for p in PROMPTS])
        task_ids = [t.id for t in ls_client.tasks.list(project=project.id)]

        # before any ranking the reward model is indifferent: candidates keep their order
        retrieve_predictions(ls_client, project.id)
        before = predicted_orders(ls_client, project.id)
        assert {tid: order for tid, (_, order) in before.items()} == {tid: ["c0", "c1", "c2"] for tid in task_ids}

        # annotators prefer the exact opposite
        for task_id in task_ids:
            ls_client.annotations.create(id=task_id, result=[{"from_name": "rank", "to_name": "answers",
                                                              "type": "ranker", "value": {"ranker": {"rank": ["c2", "c1", "c0"]}}}])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = requests.get(f"{backend.url}/status", params={"project": project.id}, timeout=5).json()
            if status["reward_versions"] and status["reward_versions"][-1]["pairs_seen"] == 3 * len(task_ids):
                break
            time.sleep(1)
        assert status["reward_versions"][-1]["pairs_seen"] == 3 * len(task_ids)

        # the new model_version makes Label Studio ask again; the new predictions follow the annotators
        retrieve_predictions(ls_client, project.id)
        after = predicted_orders(ls_client, project.id)
        assert all(version != before[tid][0] for tid, (version, _) in after.items())
        assert {tid: order for tid, (_, order) in after.items()} == {tid: ["c2", "c1", "c0"] for tid in task_ids}
    finally:
        backend.stop()
