"""The demo: settings in, a running Label Studio + backend and a narrated trip around the loop out.

It starts a real Label Studio (its own virtualenv, loopback, SQLite) and the backend, creates a
project from templates/ranker.xml, imports prompts, shows the candidates, lets a scripted
annotator rank some of them (it prefers answers that contain a number, then shorter ones),
prints every stage as the backend reports it, ranks one held-out task so the reward model is checked
on annotations it never trained on, and leaves both servers up until Ctrl-C.
"""

from __future__ import annotations

import re
import signal
import time

import requests
from label_studio_sdk import LabelStudio

from backend import labelstudio
from backend.labelconfig import RankingSchema, parse_ranking_schema
from backend.local_servers import (
    PASSWORD,
    ROOT,
    TOKEN,
    USERNAME,
    migrated_label_studio,
    start_backend,
    start_label_studio,
)
from backend.reward import is_held_out
from backend.settings import Settings, settings_env

PROMPTS = [
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Give me a tip for learning to cook.",
    "How many minutes are in an hour?",
    "What should I name my cat?",
    "How far away is the Moon?",
    "Suggest a short morning routine.",
    "How many players are on a football team?",
    "What is a good first programming language?",
    "How many continents are there?",
    # these hash into the held-out split (backend/reward.py): PPO never trains on them, they judge its result
    "What is the tallest mountain on Earth?",
    "How many bones are in the human body?",
    "How long does it take light to reach Earth from the Sun?",
    "Name a famous painter.",
]
ANNOTATED_TASKS = 4  # 4 rankings of 4 candidates: 24 pairs, past the default PPO_TRIGGER_PAIRS=20


def hidden_preference(body: str) -> tuple:
    """The scripted annotator's taste: answers with a number first, then shorter answers."""
    return (not re.search(r"\d", body), len(body))


class Narrator:
    """Prints the backend's event log as it grows."""

    def __init__(self, backend_url: str):
        self.url, self.last = backend_url, 0

    def poll(self) -> dict:
        status = requests.get(f"{self.url}/status", params={"after": self.last}, timeout=10).json()
        for event in status["events"]:
            print(f"  [{event['kind']}] {event['message']}", flush=True)
            self.last = event["id"]
        return status

    def wait(self, condition, what: str, timeout: float = 1800):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.poll()
            if condition(status):
                return status
            time.sleep(2)
        raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")


def show_candidates(client: LabelStudio, project_id: int, field: str, limit: int = 2) -> None:
    for task in list(labelstudio.iter_tasks(client, project_id))[:limit]:
        print(f"\n  task {task['id']}: {task['data'].get('prompt')}")
        for c in task["data"].get(field) or []:
            print(f"    {c['id']} (policy v{c.get('policy_version')}): {c['body'][:100]!r}")


def run_demo(settings: Settings, ls_port: int, backend_port: int, exit_when_done: bool = False) -> None:
    state = settings.model_dir.resolve()
    started = time.monotonic()
    print(f"== starting Label Studio on http://127.0.0.1:{ls_port} (first start migrates its database: ~1 min)")
    data_dir = state / "label-studio"
    ls = start_label_studio(data_dir, ls_port) if data_dir.exists() else migrated_label_studio(data_dir, ls_port)
    env = settings_env(settings.model_copy(update={"label_studio_url": ls.url, "label_studio_api_key": TOKEN,
                                                   "model_dir": state}))
    backend = None
    # SIGTERM ends the demo like Ctrl-C does, so both servers are stopped whichever way it is ended
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"== starting the backend on http://127.0.0.1:{backend_port}")
        backend = start_backend(env, port=backend_port, log=state / "backend.log")
        client = LabelStudio(base_url=ls.url, api_key=TOKEN)
        config = (ROOT / "templates" / "ranker.xml").read_text()
        schema = parse_ranking_schema(config)
        project = client.projects.create(title=f"RLHF demo {time.strftime('%H:%M:%S')}", label_config=config)
        client.ml.create(project=project.id, url=backend.url, title="RLHF backend", is_interactive=True,
                         auto_update=True)
        print(f"== project {project.id} created from templates/ranker.xml and connected to the backend")
        narrator = Narrator(backend.url)
        labelstudio.import_prompts(client, project.id, PROMPTS, schema)
        print(f"== imported {len(PROMPTS)} prompts; the policy writes {settings.num_candidates} candidates each")

        def all_have_candidates(_status) -> bool:
            return all(t["data"].get(schema.candidates_field) for t in labelstudio.iter_tasks(client, project.id))

        narrator.wait(all_have_candidates, "candidates")
        show_candidates(client, project.id, schema.candidates_field)

        print(f"\n== a scripted annotator ranks {ANNOTATED_TASKS} tasks (prefers answers with a number, then shorter)")
        for task in list(labelstudio.iter_tasks(client, project.id))[:ANNOTATED_TASKS]:
            rank_as_the_annotator(client, task, schema)
        outcome = policy_update_outcome(narrator.wait(policy_update_outcome, "the policy update"))
        seconds = time.monotonic() - started
        if outcome["kind"] == "policy":
            print(f"\n== first new policy version after {seconds:.0f}s; waiting for fresh candidates")
            narrator.wait(lambda s: not any(j["kind"] == "regenerate" and j["state"] in ("queued", "running")
                                            for j in s["recent_jobs"]), "regenerated candidates")
            show_candidates(client, project.id, schema.candidates_field, limit=ANNOTATED_TASKS + 2)
        else:  # the guard rails publish only a policy shown better: 24 pairs often show no gain
            print(f"\n== after {seconds:.0f}s the policy update was not published ({outcome['message']}); "
                  "v0 keeps serving. Rank more tasks: the next update starts after PPO_TRIGGER_PAIRS new pairs")
        held_out = next(t for t in labelstudio.iter_tasks(client, project.id) if is_held_out(t["data"]["prompt"]))
        print(f"\n== the annotator ranks a held-out task too ({held_out['data']['prompt']!r}): no policy trains on "
              "it, and the reward model is now checked on its pairs")
        rank_as_the_annotator(client, held_out, schema)
        narrator.wait(reward_checked_on_held_out_pairs, "the reward model's held-out check")
        if exit_when_done:
            return
        print(f"\n== open {ls.url}/projects/{project.id} and log in as {USERNAME} / {PASSWORD}")
        print("   rank candidates by hand and watch the loop react here. Ctrl-C stops both servers.")
        while True:
            narrator.poll()
            time.sleep(2)
    except KeyboardInterrupt:
        print("\n== stopping")
    finally:
        if backend is not None:
            backend.stop()
        ls.stop()


def rank_as_the_annotator(client: LabelStudio, task: dict, schema: RankingSchema) -> None:
    """Submit the scripted annotator's ranking of the task's candidates (`hidden_preference`) to Label Studio."""
    ranked = sorted(task["data"][schema.candidates_field], key=lambda c: hidden_preference(c["body"]))
    client.annotations.create(id=task["id"], lead_time=5.0, result=[{
        "from_name": schema.ranker_name, "to_name": schema.list_name, "type": "ranker",
        "value": {"ranker": {schema.ranker_name: [c["id"] for c in ranked]}}}])


def reward_checked_on_held_out_pairs(status: dict) -> dict | None:
    """The first reward-model fit in these events that was judged on held-out pairs, published or refused."""
    for event in status["events"]:
        if event["kind"] in ("reward", "reward_refused") and (event["data"] or {}).get("held_out_pairs"):
            return event
    return None


def policy_update_outcome(status: dict) -> dict | None:
    """The first policy update's outcome in the event log: published, refused or failed; None while it runs."""
    for event in status["events"]:
        if event["kind"] in ("policy", "policy_rejected") or (
                event["kind"] == "job_failed" and "train_policy" in event["message"]):
            return event
    return None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
