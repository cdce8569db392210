"""Candidates for new prompts: how long from TASKS_CREATED to candidates in Label Studio, idle and while
a policy update runs (issue 16's goal: at most 2x idle on this 2-core machine).

In:  a real Label Studio and a real backend (`rlhf-backend serve`: web workers, a fast-lane and a
     train-lane worker) on the defaults (SmolLM2-135M, 4 candidates x 48 tokens); a scripted annotator
     ("shorter") ranks 36 tasks so a policy update has something to train on.
Out: a markdown table of seconds from import to every imported task holding candidates, for imports
     of --batch prompts: --imports of them idle, then as many while the policy update runs; medians,
     the ratio, and whether the update was still running when each import finished.

Run: `.venv/bin/python bench/candidates_latency.py [--imports 3 --batch 4]` (about 12 minutes).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from preference_suite import PREFERENCES, verdict  # noqa: E402

from backend.local_servers import TOKEN, migrated_label_studio, start_backend, wait_for  # noqa: E402
from backend.models import DEFAULT_POLICY, resolve_policy  # noqa: E402

TRAIN_PROMPTS = [f"Give me one tip about {topic}." for topic in (
    "cooking rice", "saving money", "running", "sleeping well", "learning French", "public speaking", "gardening",
    "writing emails", "taking notes", "staying focused", "baking bread", "painting walls", "fixing a bike",
    "packing a suitcase", "drinking water", "reading more", "cleaning a kitchen", "meeting people", "job interviews",
    "studying maths", "camping", "keeping plants alive", "making coffee", "walking a dog", "learning guitar",
    "budgeting", "travelling cheaply", "cooking pasta", "stretching", "making tea", "photography", "meditation",
    "learning to swim", "writing a story", "choosing shoes", "organising a desk")]



def import_and_time(client, project_id: int, prompts: list[str]) -> float:
    """Seconds from the import call to every new task holding candidates."""
    started = time.perf_counter()
    ids = client.projects.import_tasks(id=project_id, request=[{"data": {"prompt": p, "answers": []}} for p in prompts],
                                       return_task_ids=True).task_ids
    wait_for(lambda: all(client.tasks.get(id=str(i)).data.get("answers") for i in ids), 900, "candidates", 0.25)
    return time.perf_counter() - started


def update_running(url: str) -> bool:
    return any(j["kind"] == "train_policy" and j["state"] == "running"
               for j in requests.get(f"{url}/status", timeout=10).json()["recent_jobs"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--imports", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from label_studio_sdk import LabelStudio

    work = Path(tempfile.mkdtemp(prefix="candidates-latency-"))
    label_studio = migrated_label_studio(work / "label-studio")
    model_dir = work / "model_dir"
    model_dir.mkdir()
    resolve_policy(DEFAULT_POLICY, ROOT / ".cache")
    (model_dir / "base").symlink_to(ROOT / ".cache" / "base")
    backend = start_backend({"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": label_studio.url,
                             "LABEL_STUDIO_API_KEY": TOKEN, "PPO_TRIGGER_PAIRS": "1000000"}, timeout=300)
    rows = []
    try:
        client = LabelStudio(base_url=label_studio.url, api_key=TOKEN)
        project = client.projects.create(title="latency", label_config=(ROOT / "templates/ranker.xml").read_text())
        ml = client.ml.create(project=project.id, url=backend.url, title="rlhf", is_interactive=False)
        import_and_time(client, project.id, TRAIN_PROMPTS)  # warms the fast worker's policy too
        for task in client.tasks.list(project=project.id, fields="all"):
            answers = task.data["answers"]
            tiers = verdict([c["body"] for c in answers], PREFERENCES["shorter"], "ranker")
            client.annotations.create(id=task.id, result=[{"from_name": "rank", "to_name": "answers", "type": "ranker",
                                      "value": {"ranker": {"rank": [answers[i]["id"] for t in tiers for i in t]}}}])
        counter = iter(range(10_000))
        batch = lambda: [f"Name one fact about the number {next(counter)}." for _ in range(args.batch)]  # noqa: E731
        for _ in range(args.imports):
            rows.append(("idle", import_and_time(client, project.id, batch()), False))
        client.ml.train(id=ml.id)
        wait_for(lambda: update_running(backend.url), 300, "the policy update to start")
        time.sleep(20)  # past the full reward refit, into PPO's rollouts
        for _ in range(args.imports):
            seconds = import_and_time(client, project.id, batch())
            rows.append(("during update", seconds, update_running(backend.url)))
    finally:
        backend.stop()
        label_studio.stop()

    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores; imports of {args.batch} prompts, 4 candidates x 48 tokens\n")
    print("| when | seconds to candidates | update still running after |\n|---|---|---|")
    for when, seconds, running in rows:
        print(f"| {when} | {seconds:.1f} | {'yes' if running else ('no' if when != 'idle' else '-')} |")
    idle = statistics.median(s for w, s, _ in rows if w == "idle")
    busy = statistics.median(s for w, s, _ in rows if w != "idle")
    print(f"\nmedian idle {idle:.1f}s, during a policy update {busy:.1f}s: ratio {busy / idle:.2f} (goal <= 2)")


if __name__ == "__main__":
    main()
