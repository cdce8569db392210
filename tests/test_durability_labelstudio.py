"""No ranking is ever lost: 200 annotations in all five templates, the backend SIGKILLed halfway and
restarted, and afterwards the store holds exactly the pairs that Label Studio's annotations imply."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from backend.labelconfig import BEST_OF_N, BUCKETS, PAIRWISE, RANKER, RATING, parse_ranking_schema
from backend.local_servers import TOKEN, free_port, start_backend
from backend.preferences import AnnotationError, annotation_pairs
from backend.store import Store

pytestmark = pytest.mark.labelstudio
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
NAMES = ["ranker", "ranker_buckets", "pairwise", "best_of_n", "rating"]
TASKS_PER_PROJECT = 6
ANNOTATIONS = 200


def random_result(schema, rng: random.Random) -> list[dict]:
    """A result as the Label Studio editor would write it for this template, with random choices."""
    ids = [f"c{i}" for i in range(4)]
    if schema.kind == RANKER:
        rng.shuffle(ids)
        value = {"ranker": {schema.ranker_name: ids}}
    elif schema.kind == BUCKETS:
        value = {"ranker": {b: [] for b in (*schema.buckets, "_")}}
        for i in ids:
            value["ranker"][rng.choice([*schema.buckets, "_"])].append(i)
    elif schema.kind == PAIRWISE:
        return [{"from_name": schema.control_name, "to_name": schema.control_name, "type": "pairwise",
                 "value": {"selected": rng.choice(["left", "right"])}}]
    elif schema.kind == BEST_OF_N:
        return [{"from_name": schema.control_name, "to_name": schema.prompt_field, "type": "choices",
                 "value": {"choices": [rng.choice([key for key, _ in schema.choices])]}}]
    elif schema.kind == RATING:
        return [{"from_name": s.rating_name, "to_name": s.name, "type": "rating", "value": {"rating": rng.randint(1, 5)}}
                for s in schema.slots if rng.random() < 0.8]
    return [{"from_name": schema.ranker_name, "to_name": schema.list_name, "type": "ranker", "value": value}]


def task_data(schema, prompt: str) -> dict:
    items = [{"id": f"c{i}", "title": f"Answer {i}", "body": f"{prompt} -> answer {i}", "policy_version": 0}
             for i in range(4)]
    return {schema.prompt_field: prompt, **schema.candidate_data(items)}


def expected_pairs(ls_client, project_id: int, schema) -> Counter:
    """The pairs Label Studio's current annotations imply, computed without the backend."""
    pairs = Counter()
    for task in ls_client.tasks.list(project=project_id, fields="all"):
        task = task.model_dump()
        for annotation in task.get("annotations") or []:
            try:
                found = annotation_pairs(annotation, task, schema, project_id)
            except AnnotationError:
                found = []
            pairs.update((annotation["id"], p.chosen, p.rejected, p.margin) for p in found)
    return pairs


def stored_pairs(store: Store, project_id: int) -> Counter:
    return Counter((p.annotation_id, p.chosen, p.rejected, p.margin) for p in store.pairs(project_id))


def kill_backend(backend) -> None:
    os.killpg(backend.process.pid, signal.SIGKILL)  # gunicorn, its web workers and the training worker
    backend.process.wait()


def test_store_equals_label_studio_after_sigkill_and_restart(tmp_path, tiny_env, label_studio, ls_client):
    rng = random.Random(7)
    env = {**tiny_env, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "PPO_TRIGGER_PAIRS": "1000000"}
    port = free_port()
    backend = start_backend(env, port=port)
    projects = []
    for name in NAMES:
        config = (TEMPLATES / f"{name}.xml").read_text()
        schema = parse_ranking_schema(config)
        project = ls_client.projects.create(title=f"durable {name}", label_config=config)
        ls_client.ml.create(project=project.id, url=backend.url, title="rlhf", is_interactive=False)
        ls_client.projects.import_tasks(id=project.id, request=[
            {"data": task_data(schema, f"{name} question {i}")} for i in range(TASKS_PER_PROJECT)])
        task_ids = [t.id for t in ls_client.tasks.list(project=project.id)]
        projects.append((project.id, schema, task_ids))

    made: list[int] = []
    for n in range(ANNOTATIONS):
        if n == ANNOTATIONS // 2:
            kill_backend(backend)  # webhooks of the second half reach nobody
        project_id, schema, task_ids = projects[n % len(projects)]
        action = rng.random()
        if made and action < 0.1:
            ls_client.annotations.delete(id=made.pop(rng.randrange(len(made))))
        elif made and action < 0.2:
            ls_client.annotations.update(id=rng.choice(made), result=random_result(schema, rng))
        else:
            made.append(ls_client.annotations.create(id=rng.choice(task_ids), result=random_result(schema, rng),
                                                     lead_time=1.0).id)

    backend = start_backend(env, port=port)  # the worker syncs every known project at start
    try:
        store = Store(f"sqlite:///{Path(env['MODEL_DIR']) / 'store.sqlite3'}")
        expected = {pid: expected_pairs(ls_client, pid, schema) for pid, schema, _ in projects}
        assert sum(sum(c.values()) for c in expected.values()) > 200  # the scenario makes plenty of pairs
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if all(stored_pairs(store, pid) == pairs for pid, pairs in expected.items()):
                break
            time.sleep(1)
        for pid, pairs in expected.items():
            assert stored_pairs(store, pid) == pairs, f"project {pid}"
        summaries = requests.get(f"{backend.url}/status", timeout=5).json()["projects"]
        assert {p["id"]: p["pairs"] for p in summaries} == {pid: sum(c.values()) for pid, c in expected.items()}
    finally:
        backend.stop()
