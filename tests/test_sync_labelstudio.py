"""Reconciliation against a real Label Studio: annotations made while no backend listened reach the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.local_servers import TOKEN
from backend.store import Store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.labelstudio


def answers(*bodies: str) -> list[dict]:
    return [{"id": f"c{i}", "title": f"Answer {i}", "body": b} for i, b in enumerate(bodies)]


def rank(*ids: str) -> list[dict]:
    return [{"from_name": "rank", "to_name": "answers", "type": "ranker", "value": {"ranker": {"rank": list(ids)}}}]


def run_sync(env: dict, project_id: int) -> str:
    done = subprocess.run([sys.executable, "-m", "backend.cli", "sync", "--project", str(project_id)],
                          env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sync_makes_the_store_equal_to_label_studios_annotations(tmp_path, tiny_env, label_studio, ls_client):
    env = {**tiny_env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN}
    project = ls_client.projects.create(title="sync-test", label_config=(ROOT / "templates/ranker.xml").read_text())
    ls_client.projects.import_tasks(id=project.id, request=[
        {"data": {"prompt": "2+2?", "answers": answers("4", "5", "four")}},
        {"data": {"prompt": "Capital of France?", "answers": answers("Paris", "Lyon")}},
    ])
    first, second = [t.id for t in ls_client.tasks.list(project=project.id)]
    kept = ls_client.annotations.create(id=first, result=rank("c0", "c2", "c1"))
    dropped = ls_client.annotations.create(id=second, result=rank("c0", "c1"))

    assert "2 annotations -> 4 pairs" in run_sync(env, project.id)
    store = Store(f"sqlite:///{Path(env['MODEL_DIR']) / 'store.sqlite3'}")
    assert {(p.chosen, p.rejected) for p in store.pairs(project.id)} == {
        ("4", "four"), ("4", "5"), ("four", "5"), ("Paris", "Lyon")}

    ls_client.annotations.delete(id=dropped.id)
    ls_client.annotations.update(id=kept.id, result=rank("c1", "c0", "c2"))
    assert "1 deleted annotations dropped" in run_sync(env, project.id)
    assert {(p.chosen, p.rejected) for p in store.pairs(project.id)} == {("5", "4"), ("5", "four"), ("4", "four")}


def test_a_task_deleted_in_label_studio_leaves_training_by_webhook_and_by_sync(tiny_env, label_studio, ls_client):
    import time

    import requests

    from backend.local_servers import start_backend

    env = {**tiny_env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "PPO_TRIGGER_PAIRS": "1000000"}
    project = ls_client.projects.create(title="deleted tasks", label_config=(ROOT / "templates/ranker.xml").read_text())
    backend = start_backend(env)
    try:
        ls_client.ml.create(project=project.id, url=backend.url, title="rlhf", is_interactive=False)
        ls_client.projects.import_tasks(id=project.id, request=[
            {"data": {"prompt": f"Question {i}?", "answers": answers("yes", "no")}} for i in range(3)])
        first, second, third = [t.id for t in ls_client.tasks.list(project=project.id)]
        for task_id in (first, second, third):
            ls_client.annotations.create(id=task_id, result=rank("c0", "c1"))

        def pairs() -> int:
            return requests.get(f"{backend.url}/status", params={"project": project.id}, timeout=5).json()["pairs"]

        deadline = time.monotonic() + 30
        while pairs() < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pairs() == 3
        ls_client.tasks.delete(id=str(first))  # Label Studio sends TASKS_DELETED with the id only
        deadline = time.monotonic() + 30
        while pairs() > 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pairs() == 2
    finally:
        backend.stop()

    ls_client.tasks.delete(id=str(second))  # while no backend listens: the next sync drops it
    assert "1 deleted tasks dropped" in run_sync(env, project.id)
    store = Store(f"sqlite:///{Path(env['MODEL_DIR']) / 'store.sqlite3'}")
    assert [p.task_id for p in store.pairs(project.id)] == [third]
