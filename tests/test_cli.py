"""The rlhf-backend command: its errors are one line with exit code 2, its effects land in the store."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from backend.cli import cli
from backend.settings import load_settings
from backend.store import Store


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {"MODEL_DIR": str(tmp_path / "model_dir"), "LABEL_STUDIO_API_KEY": "x" * 40}


def run(env: dict, *args: str):
    return CliRunner().invoke(cli, list(args), env=env)


def test_bad_setting_stops_with_one_line_and_exit_code_2(env):
    result = run({**env, "NUM_CANDIDATES": "many"}, "sync", "--project", "1")
    assert result.exit_code == 2
    assert "NUM_CANDIDATES" in result.output and "'many'" in result.output


def test_import_of_a_missing_file_says_which_file(env, tmp_path):
    result = run(env, "import", str(tmp_path / "nope.jsonl"), "--project", "1")
    assert result.exit_code == 2 and "nope.jsonl" in result.output and "does not exist" in result.output


def test_import_of_a_malformed_jsonl_line_names_the_line(env, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    result = run(env, "import", str(bad), "--project", "1")
    assert result.exit_code == 2 and "prompts.jsonl:2" in result.output


def test_policy_rollback_serves_the_older_version_and_queues_regeneration(env):
    store = Store(load_settings(env).store_url)
    store.create_schema()
    store.save_project(3, "<View/>")
    for v in range(3):
        store.publish_version("policy", 3, v, f"/p{v}", 0, {})
    result = run(env, "policy", "rollback", "1", "--project", "3")
    assert result.exit_code == 0, result.output
    assert store.latest_version("policy", 3).version == 1
    job = store.claim_job("t")
    assert (job.kind, job.project_id) == ("regenerate", 3)


def test_policy_rollback_to_unknown_version_fails_with_the_known_ones(env):
    result = run(env, "policy", "rollback", "9", "--project", "3")
    assert result.exit_code == 2 and "project 3 has no policy version 9" in result.output


def _store_with_pairs(env: dict) -> Store:
    from backend.ledger import AnnotationSaved
    from backend.preferences import PreferencePair

    store = Store(load_settings(env).store_url)
    store.create_schema()
    pair = PreferencePair(project_id=4, task_id=1, annotator=2, prompt="Q?", chosen="yes", rejected="no", margin=1.0,
                          chosen_policy_version=0, rejected_policy_version=0, chosen_id="c0", rejected_id="c1")
    store.apply_annotation_event(AnnotationSaved(9, 4, 1, None, (pair,)))
    return store


def test_export_writes_trl_jsonl_to_stdout_from_the_store_alone(env):
    import json

    _store_with_pairs(env)
    result = CliRunner().invoke(cli, ["export", "--project", "4"], env=env)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows == [{"prompt": "Q?\n", "chosen": "yes", "rejected": "no", "margin": 1.0}]


def test_export_hf_without_out_is_refused_with_the_fix(env):
    _store_with_pairs(env)
    result = run(env, "export", "--project", "4", "--format", "hf")
    assert result.exit_code == 2 and "--out DIR" in result.output


def test_export_of_unknown_format_names_the_supported_ones(env, tmp_path):
    _store_with_pairs(env)
    result = run(env, "export", "--project", "4", "--format", "csv", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "trl" in result.output and "hf" in result.output


def test_train_queues_one_policy_update_after_a_sync(env):
    assert run(env, "train", "--project", "5").exit_code == 0
    result = run(env, "train", "--project", "5")
    assert result.exit_code == 0 and "policy update queued" in result.output
    store = Store(load_settings(env).store_url)
    kinds = [store.claim_job("t").kind for _ in range(2)]
    assert kinds == ["sync", "train_policy"] and store.claim_job("t") is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "backend.example.com"])
def test_serve_beyond_loopback_without_auth_is_refused_with_the_fix(env, host, monkeypatch):
    monkeypatch.setattr("os.execv", lambda *a: pytest.fail("serve started without auth"))
    result = run(env, "serve", "--host", host)
    assert result.exit_code == 2 and "BASIC_AUTH_USER" in result.output and "ALLOW_UNAUTHENTICATED" in result.output


@pytest.mark.parametrize("extra, host", [({}, "127.0.0.1"), ({}, "localhost"), ({}, "::1"),
                                         ({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"}, "0.0.0.0"),
                                         ({"ALLOW_UNAUTHENTICATED": "true"}, "0.0.0.0")])
def test_serve_starts_on_loopback_with_auth_or_when_told_the_network_is_trusted(env, extra, host, monkeypatch):
    started = []
    monkeypatch.setattr("os.execv", lambda path, args: started.append(args))
    result = run({**env, **extra}, "serve", "--host", host)
    assert result.exit_code == 0 and f"{host}:9090" in started[0]


def test_serve_without_worker_runs_gunicorn_without_the_hook_that_starts_training_workers(env, monkeypatch):
    import importlib

    started = []
    monkeypatch.setattr("os.execv", lambda path, args: started.append(args))
    assert run(env, "serve", "--no-worker").exit_code == 0 and "python:backend.gunicorn_web" in started[0]
    assert run(env, "serve").exit_code == 0 and "python:backend.gunicorn_conf" in started[1]
    web, full = importlib.import_module("backend.gunicorn_web"), importlib.import_module("backend.gunicorn_conf")
    assert not hasattr(web, "when_ready") and callable(full.when_ready) and full.bind == web.bind


def test_train_wait_follows_the_update_with_a_progress_bar_and_its_events(env):
    import threading
    import time

    store = Store(load_settings(env).store_url)
    store.create_schema()

    def worker() -> None:  # stands in for the train lane: two steps, then the outcome
        while (job := store.claim_job("w", "train")) is None:
            time.sleep(0.1)
        for step in (1, 2):
            store.log_event("ppo_step", f"ppo step {step}", project=1, step=step, planned_steps=2)
        store.log_event("policy", "policy v1 published after 2 steps", project=1)
        store.finish_job(job.id)

    thread = threading.Thread(target=worker)
    thread.start()
    result = run(env, "train", "--project", "1", "--wait")
    thread.join()
    assert result.exit_code == 0, result.output
    assert "policy update: 100%" in result.output and "2/2" in result.output
    assert "[policy] policy v1 published after 2 steps" in result.output
