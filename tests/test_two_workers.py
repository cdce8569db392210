"""Two worker processes on one store, SQLite and PostgreSQL, and on PostgreSQL with a real Redis as the
job queue (as workers on other machines run): every job runs once, every trigger queues one policy
update per project, and each project's loop stays its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_worker import PROMPTS, RANKER

from backend import ledger
from backend.local_servers import wait_for
from backend.preferences import PreferencePair
from backend.settings import load_settings
from backend.store import JobRow, Store

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = (1, 2, 3)


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+redis"])
def shared_env(request, tiny_env) -> dict:
    env = {**tiny_env, "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "unused"}
    if request.param.startswith("postgresql"):
        env["DATABASE_URL"] = request.getfixturevalue("postgres_database")
    if request.param.endswith("redis"):
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    return env


def seed(store: Store, project_id: int) -> None:
    """A project of 30 tasks with candidates, 12 of them ranked: 12 pairs, past the trigger of 6."""
    store.save_project(project_id, RANKER)
    for number, prompt in enumerate(PROMPTS, start=1):
        task_id = project_id * 1000 + number
        items = [{"id": "c0", "body": f"{number * 2}"}, {"id": "c1", "body": f"I think it is {number * 2}"}]
        store.save_task(project_id, task_id, {"prompt": f"{prompt} (project {project_id})", "answers": items},
                        policy_version=0)
        if number <= 12:
            pair = PreferencePair(project_id=project_id, task_id=task_id, annotator=1, prompt=f"{prompt} (project "
                                  f"{project_id})", chosen=items[0]["body"], rejected=items[1]["body"], margin=0.0,
                                  chosen_policy_version=0, rejected_policy_version=0, chosen_id="c0", rejected_id="c1")
            store.apply_annotation_event(ledger.AnnotationSaved(task_id, project_id, task_id, None, (pair,)))


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--lane", "all", "--no-supervised"],
                            env={**os.environ, **env}, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_workers_run_each_job_once_and_each_trigger_queues_one_update_per_project(shared_env, tmp_path):
    settings = load_settings(shared_env)
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    for project_id in PROJECTS:
        seed(store, project_id)
    workers = [start_worker(shared_env, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        for project_id in PROJECTS:  # as an annotation webhook does; the reward fit queues the update
            store.enqueue("fit_reward", project_id)
        wait_for(lambda: all(store.latest_version("policy", p) and store.latest_version("policy", p).version >= 1
                             for p in PROJECTS) and not store.active_jobs(), 240, "a published policy per project")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)
        for i in range(2):
            print((tmp_path / f"worker{i}.log").read_text()[-3000:])  # shown when the test fails
    with store.reading() as s:
        jobs = list(s.query(JobRow))
    by_project = {p: [j for j in jobs if j.project_id == p] for p in PROJECTS}
    for project_id, project_jobs in by_project.items():
        updates = [j for j in project_jobs if j.kind == "train_policy"]
        assert len(updates) == 1 and updates[0].state == "done" and updates[0].attempts == 1, project_id
        fits = [j for j in project_jobs if j.kind == "fit_reward"]
        assert all(j.state == "done" and j.attempts == 1 for j in fits), project_id
        # run twice, a fit would have published a second version and an update a second policy
        assert [v.version for v in store.versions("reward", project_id)] == [1]
        assert [v.version for v in store.versions("policy", project_id)] == [0, 1]
        assert len(store.events_of(project_id, ["ppo"], limit=10)) == 1
    if settings.redis_url:  # every job's id went through Redis, none through queue tables in the database
        import redis
        from sqlalchemy import inspect

        stats = redis.Redis.from_url(settings.redis_url).info("commandstats")
        assert stats["cmdstat_zadd"]["calls"] >= len(jobs) and stats["cmdstat_zpopmin"]["calls"] >= len(jobs)
        assert not [t for t in inspect(store.engine).get_table_names() if t.startswith("rlhf_queue")]
