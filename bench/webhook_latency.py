"""Webhook ingestion: how fast the backend acknowledges ANNOTATION_CREATED, idle and under training load.

In:  a real backend (`rlhf-backend serve`: gunicorn, 2 web workers + the training worker) on tiny
     models, and the captured ANNOTATION_CREATED payload of shared/label-studio/payloads with a
     fresh annotation id per request.
Out: a markdown table: requests, throughput, p50/p99/max acknowledgement latency, for one client
     with the machine idle, and with both cores busy in another process (as during PPO), against
     Label Studio's 1 s webhook timeout.

Run: `.venv/bin/python bench/webhook_latency.py [--requests 300]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import build_tiny_encoder, build_tiny_policy  # noqa: E402

from backend.local_servers import start_backend  # noqa: E402

PAYLOAD = json.loads((ROOT.parent / "shared/label-studio/payloads/webhook_ANNOTATION_CREATED_ranker.json").read_text())["body"]


def burn_cpu(stop_at: float) -> None:
    """Keep one core busy with matrix products, as a PPO update does."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while time.time() < stop_at:
        a = torch.tanh(a @ a)


def post_annotations(url: str, n: int, first_id: int) -> list[float]:
    latencies = []
    with requests.Session() as session:
        for i in range(n):
            body = copy.deepcopy(PAYLOAD)
            body["annotation"]["id"] = first_id + i
            started = time.perf_counter()
            response = session.post(f"{url}/webhook", json=body, timeout=5)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
    return latencies


def row(label: str, latencies: list[float], seconds: float) -> str:
    q = statistics.quantiles(latencies, n=100)
    over = sum(x > 1.0 for x in latencies)
    return (f"| {label} | {len(latencies)} | {len(latencies) / seconds:.0f} | {statistics.median(latencies) * 1000:.1f} | "
            f"{q[98] * 1000:.1f} | {max(latencies) * 1000:.1f} | {over} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {"MODEL_DIR": str(tmp / "model_dir"), "POLICY_MODEL": str(build_tiny_policy(tmp / "policy")),
               "REWARD_MODEL": str(build_tiny_encoder(tmp / "encoder")), "PPO_TRIGGER_PAIRS": "1000000"}
        backend = start_backend(env)
        try:
            post_annotations(backend.url, 20, first_id=10_000_000)  # warm up both web workers
            rows = []
            started = time.perf_counter()
            idle = post_annotations(backend.url, args.requests, first_id=1)
            rows.append(row("idle machine", idle, time.perf_counter() - started))
            stop_at = time.time() + 600
            burners = [multiprocessing.Process(target=burn_cpu, args=(stop_at,)) for _ in range(2)]
            for p in burners:
                p.start()
            try:
                time.sleep(1)
                started = time.perf_counter()
                busy = post_annotations(backend.url, args.requests, first_id=args.requests + 1)
                rows.append(row("both cores busy (as during PPO)", busy, time.perf_counter() - started))
            finally:
                for p in burners:
                    p.terminate()
        finally:
            backend.stop()
    print(f"machine: {platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores, "
          f"{platform.python_version()}")
    print("| condition | requests | per second | p50 ms | p99 ms | max ms | over 1 s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
