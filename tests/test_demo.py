"""The demo's reading of the backend's event log (backend/demo.py); the demo itself runs in .ci/run."""

from backend.demo import policy_update_outcome


def event(kind: str, message: str = "") -> dict:
    return {"id": 1, "kind": kind, "message": message, "data": {}, "at": ""}


def test_the_first_policy_update_outcome_is_a_publish_a_refusal_or_a_failed_training_job():
    assert policy_update_outcome({"events": [event("ppo_step"), event("policy", "v1")]})["kind"] == "policy"
    assert policy_update_outcome({"events": [event("policy_rejected", "no gain shown")]})["message"] == "no gain shown"
    failed = event("job_failed", "train_policy job 7 failed: ValueError: x")
    assert policy_update_outcome({"events": [failed]}) is failed


def test_no_outcome_while_the_update_runs_or_when_another_job_failed():
    assert policy_update_outcome({"events": [event("ppo_step")]}) is None
    assert policy_update_outcome({"events": [event("job_failed", "generate job 3 failed: x")]}) is None
