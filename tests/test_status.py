"""The loop's status for people: what /api/status reports after a short loop on tiny models, and how
policy-update events become updates with verdicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from test_worker import job, make_worker, seed_project

from backend.app import create_app
from backend.settings import load_settings
from backend.status import MAX_TIMELINE_POINTS, LoopStatus, loop_status, policy_updates


def event(kind: str, message: str = "", /, **data) -> dict:
    return {"kind": kind, "message": message, "data": data, "at": "2026-12-02T05:00:00+00:00"}


def test_after_a_short_loop_the_status_holds_the_signal_reward_accuracy_and_the_published_update(tiny_env):
    worker = make_worker(tiny_env)  # tiny_env's guard rails let any tiny policy through
    seed_project(worker.store, annotated=12)
    worker.fit_reward(job("fit_reward"))
    worker.train_policy(job("train_policy"))
    status = loop_status(worker.store, worker.registry, 1)
    assert status.project == 1 and status.model_version.startswith("policy-v1.")
    assert [p.pairs for p in status.signal] == list(range(1, 13)) and status.signal[-1].annotations == 12
    assert status.reward_versions and status.reward_versions[-1].held_out_accuracy is not None
    [update] = status.policy_updates
    assert update.outcome == "published" and update.version == 1 and update.from_version == 0
    assert len(update.steps) == update.planned_steps == 2 and update.verdict
    assert update.held_out_gain is not None
    # the serving v1 wrote no candidates yet; v0's are shown as the previous policy's
    assert status.serving is None and status.previous.version == 0 and status.previous.samples[0].candidates
    # fit_reward's trigger queued an update (train lane) and the publish a regeneration (fast lane)
    assert sorted((j.kind, j.lane) for j in status.jobs) == [("regenerate", "fast"), ("train_policy", "train")]


def test_update_events_become_updates_with_their_outcome_in_words():
    updates = policy_updates([
        event("policy_rejected", "no policy update: 1 of 5 prompts are held out"),  # refused before training
        event("ppo", algorithm="ppo", from_version=0, planned_steps=4),
        event("ppo_step", step=1, reward_mean=0.2, kl=0.1, seconds=3.0, extra={"nll_rise": 0.05}),
        event("job_failed", "generate job 9 failed: boom", job_kind="generate"),  # not the update's
        event("ppo_step", step=2, reward_mean=0.4, kl=0.3, seconds=3.0, extra={}),
        event("policy", guard="held-out reward +0.3 (+-0.1)", version=1, algorithm="ppo", reward_new=1.3,
              reward_old=1.0, reward_se=0.1),
        event("ppo", algorithm="dpo", from_version=1),
        event("job_failed", "train_policy job 12 failed: MemoryError", job_kind="train_policy"),
        event("ppo", algorithm="ppo", from_version=1, planned_steps=4),
        event("ppo_step", step=1, reward_mean=0.1, kl=0.0, seconds=3.0),
    ])
    assert [(u.outcome, len(u.steps)) for u in updates] == [("refused", 0), ("published", 2), ("failed", 0),
                                                            ("running", 1)]
    assert "held out" in updates[0].verdict and updates[1].verdict.startswith("held-out reward")
    assert updates[1].steps[0].nll_rise == 0.05 and abs(updates[1].held_out_gain - 0.3) < 1e-9
    assert "MemoryError" in updates[2].verdict


def test_a_long_signal_is_thinned_to_a_plots_worth_keeping_the_newest_point(tiny_env):
    from backend import ledger
    from backend.preferences import PreferencePair

    worker = make_worker(tiny_env)
    worker.store.save_project(1, "<View/>")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(1, MAX_TIMELINE_POINTS * 2 + 2):
        pair = PreferencePair(project_id=1, task_id=i, annotator=1, prompt="p", chosen="a", rejected="b", margin=0.0,
                              chosen_policy_version=0, rejected_policy_version=0)
        worker.store.apply_annotation_event(ledger.AnnotationSaved(i, 1, i, start + timedelta(seconds=i), (pair,)))
    signal = loop_status(worker.store, worker.registry, 1).signal
    assert len(signal) == MAX_TIMELINE_POINTS and signal[-1].pairs == MAX_TIMELINE_POINTS * 2 + 1
    assert [p.pairs for p in signal] == sorted(p.pairs for p in signal)


def test_the_status_page_and_its_api_are_served_and_protected_like_the_api(tiny_env):
    app = create_app(load_settings({**tiny_env, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}))
    client = app.test_client()
    for path in ("/", "/static/status.js", "/api/status"):
        assert client.get(path).status_code == 401
    page = client.get("/", auth=("ls", "pw"))
    assert page.status_code == 200 and b"static/status.js" in page.data
    assert b"lineChart" in client.get("/static/status.js", auth=("ls", "pw")).data
    empty = LoopStatus.model_validate(client.get("/api/status", auth=("ls", "pw")).get_json())
    assert empty.project is None and empty.projects == []
    bad = client.get("/api/status", query_string={"project": "x"}, auth=("ls", "pw"))
    assert bad.status_code == 400 and "project" in bad.get_json()["error"]


def test_the_status_command_prints_the_projects_versions_and_updates_from_the_store(tiny_env):
    from typer.testing import CliRunner

    from backend.cli import cli

    worker = make_worker(tiny_env)
    seed_project(worker.store, annotated=12)
    worker.fit_reward(job("fit_reward"))
    worker.train_policy(job("train_policy"))
    result = CliRunner().invoke(cli, ["status", "--project", "1"], env=tiny_env, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "policy-v1.reward-v1" in result.output and "published v1" in result.output
    as_json = CliRunner().invoke(cli, ["status", "--json"], env=tiny_env)
    assert LoopStatus.model_validate_json(as_json.output).policy_updates[0].version == 1
    assert CliRunner().invoke(cli, ["--version"]).output.startswith("rlhf-backend ")
