"""Median time from an ANNOTATION_CREATED webhook to a published reward-model version.

In-process: the Flask app (create_app) receives Label Studio's real webhook payload
(shared/label-studio/payloads) with fresh HH-harmless texts, then the worker's step runs: claim the
queued fit_reward job and call `fit_reward_version` (what Worker.fit_reward does once integrated),
on the real MiniLM encoder, with SEED pairs already in the store. Goal: under 2 s.

    .venv/bin/python bench/reward_latency.py [--repeats 10] [--seed-pairs 300]
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
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.app import create_app  # noqa: E402
from backend.reward_training import UpdatePolicy, fit_reward_version, read_pairs  # noqa: E402
from backend.settings import load_settings  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
PROJECT = 1  # the captured payload's project
PAYLOAD = ROOT.parent / "shared" / "label-studio" / "payloads" / "webhook_ANNOTATION_CREATED_ranker.json"


def annotation_payload(template: dict, annotation_id: int, prompt: str, bodies: list[str]) -> dict:
    """The recorded webhook body with a new annotation id, a new task and its candidates ranked in order."""
    body = copy.deepcopy(template)
    ids = [f"c{i}" for i in range(len(bodies))]
    body["task"]["id"] = annotation_id
    body["task"]["data"] = {"prompt": prompt, "answers": [{"id": i, "title": i, "body": b} for i, b in zip(ids, bodies)]}
    body["annotation"].update(id=annotation_id, task=annotation_id, result=[{
        "from_name": "rank", "to_name": "answers", "type": "ranker", "value": {"ranker": {"rank": ids}}}])
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed-pairs", type=int, default=300, help="annotations (1 pair each) stored before timing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = read_pairs(DATA)
    template = json.loads(PAYLOAD.read_text())["body"]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"MODEL_DIR": tmp})
        app = create_app(settings)
        client, ext = app.test_client(), app.extensions["rlhf"]
        store, registry = ext["store"], ext["registry"]

        def post(annotation_id: int, pair) -> None:
            body = annotation_payload(template, annotation_id, pair.prompt, [pair.chosen, pair.rejected])
            response = client.post("/webhook", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"webhook answered {response.status_code}: {response.get_json()}")

        def worker_step() -> int | None:
            job = store.claim_job("bench")
            if job is None or job.kind != "fit_reward":
                raise RuntimeError(f"expected a queued fit_reward job, got {job}")
            project = job.project_id
            update = fit_reward_version(store, project, registry.reward_model(project),
                                        partial(registry.reward_dir, project), UpdatePolicy())
            store.finish_job(job.id)
            return update.version

        # seed: earlier annotations, one burst (one job), then one update so the timed ones are incremental
        started = time.perf_counter()
        for i, pair in enumerate(pairs[: args.seed_pairs], start=1):
            post(i, pair)
        worker_step()
        seed_seconds = time.perf_counter() - started

        latencies, versions, kinds = [], [], []
        for r in range(args.repeats):
            pair = pairs[args.seed_pairs + r]
            before = registry.reward_version(PROJECT)
            mark = time.perf_counter()
            post(10_000 + r, pair)
            version = worker_step()
            latencies.append(time.perf_counter() - mark)
            versions.append(version)
            latest = store.latest_version("reward", PROJECT)
            kinds.append("full refit" if latest.metrics.get("full_refit") else "incremental")
            if version is not None and registry.reward_version(PROJECT) <= before:
                raise RuntimeError("the update did not publish a newer version")

    published = sum(v is not None for v in versions)
    print(f"## ANNOTATION_CREATED webhook -> published reward version (default RM, MiniLM, "
          f"{args.seed_pairs} pairs already stored)\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| median latency | {statistics.median(latencies) * 1000:.0f} ms |")
    print(f"| min / max | {min(latencies) * 1000:.0f} / {max(latencies) * 1000:.0f} ms |")
    print(f"| repeats (published / refused by the gate) | {args.repeats} ({published} / {args.repeats - published}) |")
    print(f"| updates (incremental / full refit) | {kinds.count('incremental')} / {kinds.count('full refit')} |")
    print(f"| seeding ({args.seed_pairs} webhooks + first full fit, embeddings computed) | {seed_seconds:.1f} s |")
    print(f"\nMachine: {platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
