"""The demo's reading of the backend's event log and its prompts (backend/demo.py); the demo itself runs in .ci/run."""

from backend.demo import ANNOTATED_TASKS, PROMPTS, policy_update_outcome, reward_checked_on_held_out_pairs
from backend.reward import is_held_out


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


def reward_event(kind: str, held_out_pairs: int) -> dict:
    return {**event(kind, "reward model v2"), "data": {"held_out_pairs": held_out_pairs}}


def test_the_held_out_check_is_the_first_reward_fit_judged_on_held_out_pairs_published_or_refused():
    unchecked = reward_event("reward", 0)
    checked = reward_event("reward", 6)
    refused = reward_event("reward_refused", 6)
    assert reward_checked_on_held_out_pairs({"events": [unchecked, checked]}) is checked
    assert reward_checked_on_held_out_pairs({"events": [refused]}) is refused
    assert reward_checked_on_held_out_pairs({"events": [unchecked, event("ppo_step")]}) is None


def test_the_demo_imports_held_out_prompts_and_annotates_training_ones_first():
    assert any(is_held_out(prompt) for prompt in PROMPTS)
    assert not any(is_held_out(prompt) for prompt in PROMPTS[:ANNOTATED_TASKS])
