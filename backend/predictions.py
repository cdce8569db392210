"""Predictions: Label Studio tasks in, Ranker pre-annotations ordered by the reward model out.

The prediction's order is the reward model's belief; its score (the model's confidence in that
order) lets Label Studio sort tasks so annotators see the ones the model is least sure of.
"""

from __future__ import annotations

from backend.labelconfig import RANKER, RankingSchema
from backend.reward import RewardModel, ranking_confidence


def rank_prediction(task: dict, schema: RankingSchema, reward: RewardModel, model_version: str) -> dict:
    """One `{"result", "score", "model_version"}` entry: the task's candidates, best first."""
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    candidates = [c for c in schema.candidate_items(data) if isinstance(c.get("id"), str)]
    # Pre-ordering is what a Ranker shows; which bucket, side or stars a score means is the annotators' call
    if not candidates or schema.kind != RANKER:
        return {"result": [], "score": 0.0, "model_version": model_version}
    prompt = str(data.get(schema.prompt_field, ""))
    scores = reward.score([prompt] * len(candidates), [str(c.get("body", "")) for c in candidates])
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    ranked = [candidates[i]["id"] for i in order]
    value = {"ranker": {schema.ranker_name: ranked}}
    return {
        "result": [{"from_name": schema.ranker_name, "to_name": schema.list_name, "type": "ranker", "value": value}],
        "score": ranking_confidence(scores),
        "model_version": model_version,
    }
