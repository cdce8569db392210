"""The whole loop against a real Label Studio 1.23: import -> candidates -> rankings -> pairs ->
reward model -> PPO -> new policy -> fresh candidates for the tasks nobody annotated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from backend.local_servers import TOKEN, start_backend, wait_for

ROOT = Path(__file__).resolve().parents[1]
# the capitals of France, Italy and Chile hash into the held-out split: 3 held-out prompts, the fewest
# with which the guard rails can show a gain and the update runs at all
PROMPTS = ["What is the capital of France?", "How do I bake bread?", "Tell me a joke.",
           "How many days are in a week?", "Name a color.", "What is the capital of Italy?",
           "What is the capital of Chile?"]

pytestmark = pytest.mark.labelstudio



def task_list(ls_client, project_id: int) -> list[dict]:
    return [t.model_dump() for t in ls_client.tasks.list(project=project_id, fields="all")]


def predicted_ids(ls_client, task_id: int) -> list[list[str]]:
    """The candidate ids each of a task's predictions ranks."""
    return [p.result[0]["value"]["ranker"]["rank"] for p in ls_client.predictions.list(task=task_id)]


def candidate_ids(task: dict) -> list[str]:
    return [c["id"] for c in task["data"]["answers"]]


def candidate_versions(task: dict) -> set:
    return {c.get("policy_version") for c in task["data"].get("answers") or []}


@pytest.fixture
def loop(tmp_path, tiny_env, label_studio, ls_client):
    """A project from templates/ranker.xml connected to a backend on the tiny models."""
    env = {**tiny_env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN}
    backend = start_backend(env)
    project = ls_client.projects.create(title=f"rlhf-{tmp_path.name}", label_config=(ROOT / "templates/ranker.xml").read_text())
    ls_client.ml.create(project=project.id, url=backend.url, title="rlhf", is_interactive=True, auto_update=True)
    yield env, backend, project.id
    backend.stop()
    print(backend.log.read_text()[-5000:])


def test_loop_runs_from_import_through_the_policy_update_to_fresh_candidates(loop, ls_client, tmp_path):
    env, backend, project_id = loop
    # a second project on the same backend: its own loop, untouched by the first one's annotations
    other = ls_client.projects.create(title=f"other-{tmp_path.name}", label_config=(ROOT / "templates/ranker.xml").read_text())
    ls_client.ml.create(project=other.id, url=backend.url, title="rlhf", is_interactive=True, auto_update=True)
    ls_client.projects.import_tasks(id=other.id, request=[{"data": {"prompt": "Name a tree.", "answers": []}}])

    def project_status() -> dict:
        return requests.get(f"{backend.url}/status", params={"project": project_id}, timeout=5).json()

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS))

    # import through the CLI: prompt-only tasks with an empty candidate list
    imported = subprocess.run([sys.executable, "-m", "backend.cli", "import", str(prompts_file), "--project",
                               str(project_id)], env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT)
    assert imported.returncode == 0, imported.stderr
    assert f"imported {len(PROMPTS)} prompts" in imported.stdout

    # the TASKS_CREATED webhook makes the worker write 3 candidates from policy v0 into every task
    tasks = wait_for(lambda: (ts := task_list(ls_client, project_id)) and all(len(t["data"]["answers"]) == 3 for t in ts) and ts,
                     120, "candidates in every task")
    assert all(candidate_versions(t) == {0} for t in tasks)
    assert sorted(t["data"]["prompt"] for t in tasks) == sorted(PROMPTS)
    # Label Studio stores a prediction for each task's v0 candidates, as it does when annotators open them
    ls_client.actions.create(id="retrieve_tasks_predictions", project=project_id,
                             selected_items={"all": True, "excluded": []})
    assert all(sorted(predicted_ids(ls_client, t["id"])[0]) == sorted(candidate_ids(t)) for t in tasks)
    v0_ids = {t["id"]: set(candidate_ids(t)) for t in tasks}

    # an annotator ranks two tasks: 2 x 3 pairs reach PPO_TRIGGER_PAIRS=6
    annotated = tasks[:2]
    for task in annotated:
        order = [c["id"] for c in reversed(task["data"]["answers"])]
        ls_client.annotations.create(id=task["id"], lead_time=3.0, result=[
            {"from_name": "rank", "to_name": "answers", "type": "ranker", "value": {"ranker": {"rank": order}}}])

    status = wait_for(lambda: (s := project_status())["pairs"] == 6 and s, 30, "6 pairs in the store")
    assert status["pairs"] == 6

    # the reward model is refitted, PPO runs and publishes policy v1
    status = wait_for(lambda: (s := project_status())["policy_versions"]
                      and s["policy_versions"][-1]["version"] >= 1 and s, 300, "policy v1")
    assert status["reward_versions"][-1]["version"] >= 1
    assert status["reward_versions"][-1]["pairs_seen"] == 6
    assert Path(status["policy_versions"][-1]["path"]).is_dir()
    assert status["policy_versions"][-1]["metrics"]["algorithm"] == "ppo"

    # unannotated tasks get candidates from v1; annotated tasks keep what their annotator ranked
    annotated_ids = {t["id"] for t in annotated}
    tasks = wait_for(lambda: (ts := task_list(ls_client, project_id)) and all(
        candidate_versions(t) == {1} for t in ts if t["id"] not in annotated_ids) and ts, 120, "fresh candidates from v1")
    assert all(candidate_versions(t) == {0} for t in tasks if t["id"] in annotated_ids)
    # regenerated candidates have ids of their own, and the one prediction left orders exactly them
    fresh = [t for t in tasks if t["id"] not in annotated_ids]
    assert all(not set(candidate_ids(t)) & v0_ids[t["id"]] for t in fresh)
    for task in fresh:
        predictions = predicted_ids(ls_client, task["id"])
        assert len(predictions) == 1 and sorted(predictions[0]) == sorted(candidate_ids(task)), (task, predictions)
    assert "policy-v1" in requests.post(f"{backend.url}/setup", json={
        "project": f"{project_id}.1", "schema": (ROOT / "templates/ranker.xml").read_text()}, timeout=5).json()["model_version"]

    # the other project kept its own loop: no pairs, no reward model, the base policy and its candidates
    untouched = requests.get(f"{backend.url}/status", params={"project": other.id}, timeout=5).json()
    assert (untouched["model_version"], untouched["pairs"], untouched["reward_versions"]) == ("policy-v0.reward-v0", 0, [])
    [other_task] = task_list(ls_client, other.id)
    assert candidate_versions(other_task) == {0}
