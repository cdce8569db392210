"""The training workers under supervision, as real processes (`rlhf-backend serve` on the tiny models):
a reward update runs while a policy update does (two lanes); SIGKILL the train worker in the middle of
the update and it comes back, its job is retried, nothing half-written is published, the fast worker is
left alone, and /health and /metrics say how many workers are alive."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests
from test_worker import seed_project

from backend.local_servers import start_backend, wait_for
from backend.settings import load_settings
from backend.store import Store


def worker_pids(store: Store, job_id: int | None = None) -> set[int]:
    """Live workers' pids; with `job_id`, only the one running it."""
    return {int(w["id"].rsplit(":", 1)[1]) for w in store.live_workers(within_seconds=15)
            if job_id is None or w["job"] == job_id}


@pytest.mark.parametrize("queue", ["sqlite", "redis"])
def test_a_worker_killed_mid_update_is_restarted_and_its_job_retried(tiny_env, queue, request):
    # 400 tiny steps (about 25 s here; 60 finished before the kill) to be killed in the middle of; no
    # Label Studio: regeneration afterwards may fail
    env = {**tiny_env, "PPO_STEPS": "400", "PPO_TRIGGER_PAIRS": "1000000", "LABEL_STUDIO_URL": "http://127.0.0.1:9"}
    if queue == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    settings = load_settings(env)
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    seed_project(store, annotated=30)
    backend = start_backend(env)
    try:
        # two lanes: a fast worker (candidates, reward updates) and a train worker (policy updates)
        assert wait_for(lambda: requests.get(f"{backend.url}/health", timeout=5).json()["training_workers"]["alive"]
                        == 2, 60, "two live training workers")
        job_id = store.enqueue("train_policy", 1)
        wait_for(lambda: any(e["kind"] == "ppo_step" for e in store.events(limit=20)), 120, "the update's first step")
        # the fast lane does not wait behind the update
        refit = store.enqueue("fit_reward", 1)
        wait_for(lambda: store.job_state(refit) == "done", 30, "a reward update during the policy update")
        assert store.job_state(job_id) == "running"
        [first] = wait_for(lambda: worker_pids(store, job_id), 15, "the train lane's beat naming its job")
        others = worker_pids(store) - {first}
        os.kill(first, signal.SIGKILL)

        # the supervisor notices, puts the job back at once and starts a new worker, which retries it
        restarted = wait_for(lambda: [e for e in store.events(limit=50) if e["kind"] == "worker_restarted"], 30,
                             "the restart")
        assert "signal SIGKILL" in restarted[0]["message"] and restarted[0]["data"]["pid"] == first
        wait_for(lambda: worker_pids(store) - {first} - others, 60, "a new worker")
        assert others <= worker_pids(store)  # the fast lane's worker was left alone
        finished = wait_for(lambda: store.job_state(job_id) in ("done", "failed") and store.jobs(limit=100), 300,
                            "the retried update to finish")
        job = next(j for j in finished if j["id"] == job_id)
        assert job["state"] == "done", job["error"]
        with store.session() as s:
            from backend.store import JobRow

            assert s.get(JobRow, job_id).attempts == 2
        # no version without its complete directory; the killed run's staging directory was never published
        for version in store.versions("policy", 1):
            assert (Path(version.path) / "config.json").exists(), version
        health = requests.get(f"{backend.url}/health", timeout=5).json()
        assert health["status"] == "UP" and health["training_workers"]["alive"] == 2 and health["queue"] == queue
        assert "rlhf_training_workers_alive 2.0" in requests.get(f"{backend.url}/metrics", timeout=5).text
    finally:
        backend.stop()
        print(backend.log.read_text()[-6000:])  # shown when the test fails
