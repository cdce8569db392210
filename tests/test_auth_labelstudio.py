"""Basic auth against a real Label Studio 1.23: with credentials on the model connection, its health
checks, setup, predictions and webhooks all reach a backend that refuses requests without them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from backend.local_servers import TOKEN, start_backend

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.labelstudio
USER, PASSWORD = "labelstudio", "s3cret-pässword"


def test_label_studio_reaches_a_backend_behind_basic_auth(tiny_env, label_studio, ls_client):
    env = {**tiny_env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "PPO_TRIGGER_PAIRS": "1000000", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD}
    backend = start_backend(env)
    try:
        assert requests.get(f"{backend.url}/status", timeout=5).status_code == 401
        project = ls_client.projects.create(title="basic auth", label_config=(ROOT / "templates/ranker.xml").read_text())
        ls_client.ml.create(project=project.id, url=backend.url, title="rlhf", is_interactive=False,
                            auth_method="BASIC_AUTH", basic_auth_user=USER, basic_auth_pass=PASSWORD)

        def status() -> dict:
            return requests.get(f"{backend.url}/status", params={"project": project.id}, auth=(USER, PASSWORD),
                                timeout=5).json()

        # Label Studio's own webhook to /webhook sends no credentials: the worker adds the header
        deadline = time.monotonic() + 60
        while not any(e["kind"] == "webhook_secured" for e in status()["events"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        hooks = [h for h in ls_client.webhooks.list(project=str(project.id)) if h.url.endswith("/webhook")]
        assert len(hooks) == 1 and hooks[0].headers["Authorization"].startswith("Basic ")
        ls_client.projects.import_tasks(id=project.id, request=[{"data": {"prompt": "Name a fruit.", "answers": []}}])

        deadline = time.monotonic() + 120  # TASKS_CREATED arrived: the worker wrote candidates
        while not any(e["kind"] == "candidates" for e in status()["events"]) and time.monotonic() < deadline:
            time.sleep(1)
        task = ls_client.tasks.list(project=project.id, fields="all").__iter__().__next__()
        assert len(task.data["answers"]) == 3
        ids = [c["id"] for c in task.data["answers"]]
        ls_client.annotations.create(id=task.id, result=[{"from_name": "rank", "to_name": "answers", "type": "ranker",
                                                          "value": {"ranker": {"rank": ids[::-1]}}}])
        deadline = time.monotonic() + 30
        while status()["pairs"] < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status()["pairs"] == 3  # ANNOTATION_CREATED arrived
        ls_client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                                 selected_items={"all": True, "excluded": []})
        predictions = ls_client.predictions.list(task=task.id)
        assert predictions and sorted(predictions[-1].result[0]["value"]["ranker"]["rank"]) == sorted(ids)
    finally:
        backend.stop()
    assert PASSWORD not in backend.log.read_text() and TOKEN not in backend.log.read_text()
