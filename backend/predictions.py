"""Predictions: Label Studio tasks in, Ranker pre-annotations ordered by the reward model out.

The prediction's order is the reward model's belief; its score (the model's confidence in that
order) lets Label Studio sort tasks so annotators see the ones the model is least sure of.
"""

from __future__ import annotations

import logging

from backend.labelconfig import RANKER, RankingSchema
from backend.promotion import PROMOTION_FIELD
from backend.reward import RewardModel, ranking_confidence

log = logging.getLogger(__name__)

# The encoder reads its first 256 tokens (about 1,000-2,000 characters); a text of megabytes would only
# slow the n-gram and count heads down (3 MB took 12 s), so the reward model scores its first 8,000.
MAX_SCORED_CHARS = 8000


def fields_of_config(task: dict, schema: RankingSchema) -> bool:
    """Whether the task carries a field the label config names: its prompt or its candidates."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    return bool(data.get(schema.prompt_field)) or bool(schema.candidate_items(data))


def truncated(text: str, what: str, task_id) -> str:
    if len(text) <= MAX_SCORED_CHARS:
        return text
    log.warning("task %s: %s of %d characters scored on its first %d", task_id, what, len(text), MAX_SCORED_CHARS)
    return text[:MAX_SCORED_CHARS]


def empty(model_version: str, reason: str) -> dict:
    """No order to show, and why (Label Studio ignores `reason`; the API's users read it)."""
    return {"result": [], "score": 0.0, "model_version": model_version, "reason": reason}


def rank_prediction(task: dict, schema: RankingSchema, reward: RewardModel, model_version: str) -> dict:
    """One `{"result", "score", "model_version"}` entry: the task's candidates, best first; with a
    `reason` instead when there is nothing to order."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    candidates = [c for c in schema.candidate_items(data) if isinstance(c.get("id"), str)]
    # Pre-ordering is what a Ranker shows; which bucket, side or stars a score means is the annotators' call
    if schema.kind != RANKER:
        return empty(model_version, f"the label config is a {schema.kind} template: only a Ranker is pre-ordered")
    if PROMOTION_FIELD in data:  # the annotators judge two policies: the reward model's belief must not show
        return empty(model_version, "a blind comparison of two policies: not pre-ordered")
    if not candidates:
        return empty(model_version, f"the task has no candidates with ids in '{schema.candidates_field}' yet: the "
                                    "backend writes them after TASKS_CREATED")
    prompt = truncated(str(data.get(schema.prompt_field, "")), "the prompt", task.get("id"))
    scores = reward.score([prompt] * len(candidates),
                          [truncated(str(c.get("body", "")), f"candidate {c['id']}", task.get("id")) for c in candidates])
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    ranked = [candidates[i]["id"] for i in order]
    value = {"ranker": {schema.ranker_name: ranked}}
    return {
        "result": [{"from_name": schema.ranker_name, "to_name": schema.list_name, "type": "ranker", "value": value}],
        "score": ranking_confidence(scores),
        "model_version": model_version,
    }
