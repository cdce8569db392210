"""Webhooks under sustained load while a policy update runs: ack latency, errors, and nothing lost.

In:  a real backend (`rlhf-backend serve`: gunicorn with 2 web workers, a fast and a train worker)
     on tiny models, one project of 30 ranked tasks, and a policy update of many steps running in the
     train lane; then ANNOTATION_CREATED webhooks (the captured payload, each a new annotation on a
     new task, 3 pairs each) sent open-loop at a fixed rate from a pool of client threads, so a slow
     answer does not lower the rate. Every annotation also queues a reward update (the fast lane).
Out: a markdown table of two phases, the train lane idle (the baseline) and during the update:
     requests, achieved rate, p50/p99/max ack latency, errors; and the pairs the store holds
     afterwards against the pairs sent (goal: p99 < 50 ms, 0 errors, none lost).

Run: `.venv/bin/python bench/webhook_load.py [--rate 50] [--seconds 60]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import build_tiny_encoder, build_tiny_policy  # noqa: E402

from backend.local_servers import start_backend, wait_for  # noqa: E402
from backend.settings import load_settings  # noqa: E402
from backend.store import Store  # noqa: E402

PAYLOADS = ROOT.parent / "shared" / "label-studio" / "payloads"
ANNOTATION = json.loads((PAYLOADS / "webhook_ANNOTATION_CREATED_ranker.json").read_text())["body"]
CONFIG = (ROOT / "templates" / "ranker.xml").read_text()
PROJECT = ANNOTATION["project"]["id"]
SEED_TASKS = 30


def annotation(number: int) -> dict:
    """The captured ranking as a new annotation on a new task, its prompt its own (3 pairs)."""
    body = copy.deepcopy(ANNOTATION)
    body["task"]["id"] = body["annotation"]["task"] = 100_000 + number
    body["annotation"]["id"] = 100_000 + number
    body["task"]["data"]["prompt"] = f"Load question {number}: what is {number} plus {number}?"
    return body


def seed_project(url: str) -> None:
    """A project of SEED_TASKS tasks with candidates, each ranked: what a policy update trains on."""
    requests.post(f"{url}/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG}, timeout=10).raise_for_status()
    for i in range(SEED_TASKS):
        body = annotation(i)
        body["task"]["id"] = body["annotation"]["task"] = i + 1
        body["annotation"]["id"] = i + 1
        body["task"]["data"]["prompt"] = f"Seed question {i}: name a colour."
        requests.post(f"{url}/webhook", json={"action": "TASKS_CREATED", "project": body["project"],
                                              "tasks": [body["task"]]}, timeout=10).raise_for_status()
        requests.post(f"{url}/webhook", json=body, timeout=10).raise_for_status()


def send_at_rate(url: str, rate: float, seconds: float, threads: int, first: int) -> tuple[list[float], list[str], float]:
    """Open-loop load: request i leaves at start + i / rate, whoever is still waiting for an answer."""
    latencies, errors, lock = [], [], threading.Lock()
    local = threading.local()

    def send(number: int, due: float) -> None:
        time.sleep(max(0.0, due - time.perf_counter()))
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        started = time.perf_counter()
        try:
            response = session.post(f"{url}/webhook", json=annotation(number), timeout=5)
            ok = response.status_code == 200
            reason = f"{response.status_code} {response.text[:80]}"
        except requests.RequestException as exc:
            ok, reason = False, type(exc).__name__
        with lock:
            latencies.append(time.perf_counter() - started)
            if not ok:
                errors.append(reason)

    total = int(rate * seconds)
    start = time.perf_counter() + 0.5
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for number in range(total):
            pool.submit(send, first + number, start + number / rate)
    return latencies, errors, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=16, help="client threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {"MODEL_DIR": str(tmp / "model_dir"), "POLICY_MODEL": str(build_tiny_policy(tmp / "policy")),
               "REWARD_MODEL": str(build_tiny_encoder(tmp / "encoder")), "PPO_TRIGGER_PAIRS": "1000000",
               "PPO_STEPS": "5000", "LABEL_STUDIO_URL": "http://127.0.0.1:9"}  # no Label Studio: none is needed
        store = Store(load_settings(env).store_url)
        backend = start_backend(env)
        phases = []
        try:
            seed_project(backend.url)
            sent = SEED_TASKS
            # the baseline, in the same run: the same load with the train lane idle
            latencies, errors, elapsed = send_at_rate(backend.url, args.rate, args.seconds, args.threads, sent)
            phases.append(("train lane idle", latencies, errors, elapsed, None))
            sent += len(latencies)
            update = store.enqueue("train_policy", PROJECT)
            wait_for(lambda: any(e["kind"] == "ppo_step" for e in store.events(limit=50)), 300, "the update's first step")
            latencies, errors, elapsed = send_at_rate(backend.url, args.rate, args.seconds, args.threads, sent)
            phases.append(("during a policy update", latencies, errors, elapsed, store.job_state(update)))
            sent += len(latencies)
            expected = 3 * sent
            try:
                wait_for(lambda: store.pair_count(PROJECT) >= expected, 60, "every pair")
            except TimeoutError:
                pass  # reported below: stored < sent
            stored = store.pair_count(PROJECT)
        finally:
            backend.stop()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; tiny models; {args.rate:.0f} requests/s for {args.seconds:.0f} s per phase; "
          f"pairs stored / sent: {stored} / {expected}\n")
    print("| phase | requests | achieved rate | p50 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for label, latencies, errors, elapsed, state in phases:
        q = statistics.quantiles(latencies, n=100)
        label += "" if state is None else f" (still {state} at the end)"
        print(f"| {label} | {len(latencies)} | {len(latencies) / elapsed:.1f} per s | "
              f"{statistics.median(latencies) * 1000:.1f} | {q[98] * 1000:.1f} | {max(latencies) * 1000:.1f} | "
              f"{len(errors)} |")
        if errors:
            print(f"\nfirst errors ({label}):", errors[:5])

if __name__ == "__main__":
    main()
