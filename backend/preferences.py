"""Preferences: a Label Studio annotation in, the preference pairs it implies out.

A ranking of k candidates gives the k(k-1)/2 pairs (better, worse). With <Bucket>s, items
in an earlier bucket beat those in later ones, items in the same bucket tie (no pair) and
unsorted items ("_") say nothing. Cancelled (skipped) annotations give no pairs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import combinations

from backend.labelconfig import RankingSchema

UNSORTED = "_"  # Label Studio's key for items left outside every bucket


class AnnotationError(ValueError):
    """An annotation that cannot be turned into pairs; the message says why."""


@dataclass(frozen=True)
class PreferencePair:
    project_id: int
    task_id: int
    annotator: int | None
    prompt: str
    chosen: str
    rejected: str
    margin: float
    chosen_policy_version: int | None
    rejected_policy_version: int | None

    def as_row(self) -> dict:
        return asdict(self)


def ranked_tiers(value: dict, schema: RankingSchema) -> list[list[str]]:
    """Candidate ids grouped best tier first: one id a tier for a ranking, one bucket a tier for buckets."""
    ranker = value.get("ranker")
    if not isinstance(ranker, dict):
        raise AnnotationError(f"ranker result has no 'ranker' mapping: {value!r}")
    if schema.buckets:
        unknown = set(ranker) - set(schema.buckets) - {UNSORTED}
        if unknown:
            raise AnnotationError(f"ranker result names buckets {sorted(unknown)} that the label config lacks")
        return [list(ranker.get(bucket, [])) for bucket in schema.buckets]
    order = ranker.get(schema.ranker_name)
    if order is None:  # Label Studio keys a plain ranking by the Ranker's name; accept a lone other key
        order = next((v for k, v in ranker.items() if k != UNSORTED), [])
    return [[item] for item in order]


def pairs_from_tiers(tiers: list[list[str]]) -> list[tuple[str, str]]:
    """(chosen, rejected) id pairs: every item beats every item of every later tier."""
    return [(better, worse) for hi, lo in combinations(range(len(tiers)), 2) for better in tiers[hi] for worse in tiers[lo]]


def annotation_pairs(annotation: dict, task: dict, schema: RankingSchema, project_id: int) -> list[PreferencePair]:
    """The preference pairs of one annotation of `task` (its full Label Studio record)."""
    if annotation.get("was_cancelled"):
        return []
    data = task.get("data") or {}
    candidates = {c.get("id"): c for c in data.get(schema.candidates_field) or [] if isinstance(c, dict)}
    results = [r for r in annotation.get("result") or [] if r.get("from_name") == schema.ranker_name]
    pairs: list[PreferencePair] = []
    for result in results:
        tiers = ranked_tiers(result.get("value") or {}, schema)
        missing = sorted({i for tier in tiers for i in tier} - set(candidates))
        if missing:
            raise AnnotationError(
                f"annotation {annotation.get('id')} ranks candidates {missing} that task {task.get('id')} does not have"
            )
        for chosen, rejected in pairs_from_tiers(tiers):
            pairs.append(PreferencePair(
                project_id=project_id,
                task_id=int(task["id"]),
                annotator=annotation.get("completed_by"),
                prompt=str(data.get(schema.prompt_field, "")),
                chosen=str(candidates[chosen].get("body", "")),
                rejected=str(candidates[rejected].get("body", "")),
                margin=0.0,
                chosen_policy_version=candidates[chosen].get("policy_version"),
                rejected_policy_version=candidates[rejected].get("policy_version"),
            ))
    return pairs
