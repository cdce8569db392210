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
