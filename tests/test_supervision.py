"""The training worker under supervision, as real processes (`rlhf-backend serve` on the tiny models):
SIGKILL it in the middle of a policy update and it comes back, its job is retried, nothing half-written
is published, and /health and /metrics say how many workers are alive."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import requests
from test_worker import seed_project

from backend.local_servers import start_backend
from backend.settings import load_settings
from backend.store import Store


def wait_for(condition, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def worker_pids(store: Store) -> set[int]:
    return {int(w["id"].rsplit(":", 1)[1]) for w in store.live_workers(within_seconds=15)}


def test_a_worker_killed_mid_update_is_restarted_and_its_job_retried(tiny_env):
    # long enough a run to be killed in the middle of; no Label Studio: regeneration afterwards may fail
    env = {**tiny_env, "PPO_STEPS": "60", "PPO_TRIGGER_PAIRS": "1000000", "LABEL_STUDIO_URL": "http://127.0.0.1:9"}
    store = Store(load_settings(env).store_url)
    store.create_schema()
    seed_project(store, annotated=30)
    backend = start_backend(env)
    try:
        assert wait_for(lambda: requests.get(f"{backend.url}/health", timeout=5).json()["training_workers"]["alive"],
                        60, "a live training worker") == 1
        job_id = store.enqueue("train_policy", None)
        wait_for(lambda: any(e["kind"] == "ppo_step" for e in store.events(limit=20)), 120, "the update's first step")
        [first] = worker_pids(store)
        os.kill(first, signal.SIGKILL)

        # the supervisor notices, puts the job back at once and starts a new worker, which retries it
        restarted = wait_for(lambda: [e for e in store.events(limit=50) if e["kind"] == "worker_restarted"], 30,
                             "the restart")
        assert "signal SIGKILL" in restarted[0]["message"] and restarted[0]["data"]["pid"] == first
        wait_for(lambda: worker_pids(store) - {first}, 60, "a new worker")
        finished = wait_for(lambda: store.job_state(job_id) in ("done", "failed") and store.jobs(limit=100), 300,
                            "the retried update to finish")
        job = next(j for j in finished if j["id"] == job_id)
        assert job["state"] == "done", job["error"]
        with store.session() as s:
            from backend.store import JobRow

            assert s.get(JobRow, job_id).attempts == 2
        # no version without its complete directory; the killed run's staging directory was never published
        for version in store.versions("policy"):
            assert (Path(version.path) / "config.json").exists(), version
        health = requests.get(f"{backend.url}/health", timeout=5).json()
        assert health["status"] == "UP" and health["training_workers"]["alive"] == 1
        assert "rlhf_training_workers_alive 1.0" in requests.get(f"{backend.url}/metrics", timeout=5).text
    finally:
        backend.stop()
