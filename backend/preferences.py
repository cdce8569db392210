"""Preferences: a Label Studio annotation in, the preference pairs it implies out.

Every format is first read as tiers of candidates, best tier first; every candidate then beats
every candidate of every later tier, and candidates of one tier tie (no pair):
- ranker: one candidate a tier, so k ranked candidates give k(k-1)/2 pairs.
- buckets: one bucket a tier; unsorted items ("_") say nothing.
- pairwise: the selected side, then the other.
- best_of_n: the picked candidate(s), then every other candidate the task shows; a choice that
  names no candidate (e.g. "tie") says nothing.
- rating: candidates grouped by rating; margin = rating(chosen) - rating(rejected), in rating
  steps (1..maxRating-1 on a 1..maxRating scale), the Llama 2 reward margin. Unrated say nothing.
Ordinal formats give margin 0. Cancelled (skipped) annotations give no pairs, and neither do two
candidates with identical text (a pair of equal texts carries no preference, only loss noise).
Label Studio does not validate results, so anything naming a candidate, bucket, side or choice
the task or config lacks is refused with `AnnotationError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import combinations

from backend.labelconfig import BEST_OF_N, PAIRWISE, RATING, RankingSchema

UNSORTED = "_"  # Label Studio's key for items left outside every bucket
SIDES = ("left", "right")  # Pairwise's `selected` values, for toName's first and second tag


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
    annotation_id: int | None = None
    chosen_id: str | None = None  # the candidate's id in the task (agreement compares ids, not texts)
    rejected_id: str | None = None

    def as_row(self) -> dict:
        """The store's preference_pairs columns."""
        return asdict(self)


def pair_field(pair, key: str):
    """A field of a pair given as a `PreferencePair`, a store row or a plain dict (None if absent)."""
    return pair.get(key) if isinstance(pair, dict) else getattr(pair, key, None)


def task_candidates(data: dict, schema: RankingSchema) -> dict[str, dict]:
    """The candidates a task shows, keyed as results name them: item ids for a List, slot names otherwise.

    A slot's text is what the annotator judged, so it wins over the candidate list; the list
    item at the slot's position lends its id and policy version only when its body matches.
    """
    items = schema.candidate_items(data)
    if not schema.slots:
        return {str(c["id"]): c for c in items if "id" in c}
    shown: dict[str, dict] = {}
    for i, slot in enumerate(schema.slots):
        body = data.get(slot.field)
        if not isinstance(body, str):
            continue
        item = items[i] if i < len(items) and str(items[i].get("body", "")) == body else {}
        shown[slot.name] = {"id": str(item.get("id", slot.name)), "body": body,
                            "policy_version": item.get("policy_version")}
    return shown


def ranked_tiers(value: dict, schema: RankingSchema) -> list[list[str]]:
    """Candidate ids grouped best tier first: one id a tier for a ranking, one bucket a tier for buckets."""
    ranker = value.get("ranker")
    if not isinstance(ranker, dict) or not all(
            isinstance(v, list) and all(isinstance(i, str) for i in v) for v in ranker.values()):
        raise AnnotationError(f"ranker result needs a 'ranker' mapping of candidate-id lists, got {value!r}"[:300])
    if schema.buckets:
        unknown = set(ranker) - set(schema.buckets) - {UNSORTED}
        if unknown:
            raise AnnotationError(f"ranker result names buckets {sorted(unknown)} that the label config lacks")
        return [list(ranker.get(bucket, [])) for bucket in schema.buckets]
    order = ranker.get(schema.ranker_name)
    if order is None:  # Label Studio keys a plain ranking by the Ranker's name; accept a lone other key
        order = next((v for k, v in ranker.items() if k != UNSORTED), [])
    return [[item] for item in order]


def pairwise_tiers(value: dict) -> list[list[str]]:
    """Sides, winner first: "left" is the Pairwise toName's first tag."""
    selected = value.get("selected")
    if selected not in SIDES:
        raise AnnotationError(f"pairwise result must select 'left' or 'right', got {selected!r}")
    return [[selected], [SIDES[1 - SIDES.index(selected)]]]


def best_of_n_tiers(value: dict, schema: RankingSchema, shown: list[str]) -> list[list[str]]:
    """The picked candidates, then the rest of those shown; nothing if a pick names no candidate."""
    picked = value.get("choices")
    if not isinstance(picked, list) or not picked or not all(isinstance(c, str) for c in picked):
        raise AnnotationError(f"choices result needs a non-empty 'choices' list of strings, got {value!r}"[:300])
    mapping = dict(schema.choices)
    unknown = [c for c in picked if c not in mapping]
    if unknown:
        raise AnnotationError(f"choices {unknown} are not <Choice>s of {schema.control_name!r}")
    if any(mapping[c] is None for c in picked):
        return []
    best = [mapping[c] for c in picked]
    return [best, [s for s in shown if s not in best]]


def rating_levels(results: list[dict], schema: RankingSchema) -> dict[str, float]:
    """Each rated slot's rating, checked against its Rating's 1..maxRating scale."""
    by_rating = {slot.rating_name: slot for slot in schema.slots}
    ratings: dict[str, float] = {}
    for result in results:
        slot = by_rating[result["from_name"]]
        rating = (result.get("value") or {}).get("rating")
        if isinstance(rating, bool) or not isinstance(rating, int | float) or not 1 <= rating <= slot.max_rating:
            raise AnnotationError(f"rating {result['from_name']!r} must be 1..{slot.max_rating}, got {rating!r}")
        if slot.name in ratings:
            raise AnnotationError(f"candidate {slot.name!r} is rated twice")
        ratings[slot.name] = float(rating)
    return ratings


def pairs_from_tiers(tiers: list[list[str]]) -> list[tuple[str, str]]:
    """(chosen, rejected) id pairs: every item beats every item of every later tier."""
    return [(better, worse) for hi, lo in combinations(range(len(tiers)), 2) for better in tiers[hi] for worse in tiers[lo]]


def _control_results(annotation: dict, names: set[str]) -> list[dict]:
    results = annotation.get("result") or []
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise AnnotationError(f"annotation {annotation.get('id')} 'result' must be a list of objects")
    return [r for r in results if isinstance(r.get("from_name"), str) and r["from_name"] in names]


def _single(results: list[dict], annotation: dict) -> dict | None:
    if len(results) > 1:  # two orders in one annotation would contradict or double-count
        raise AnnotationError(f"annotation {annotation.get('id')} has {len(results)} results for "
                              f"{results[0].get('from_name')!r}; expected one")
    return (results[0].get("value") or {}) if results else None


def annotation_tiers(annotation: dict, schema: RankingSchema, shown: list[str]) -> tuple[list[list[str]], dict]:
    """The annotation's candidate keys, best tier first, and each key's level (ratings only; else empty)."""
    if schema.kind == RATING:
        levels = rating_levels(_control_results(annotation, {s.rating_name for s in schema.slots}), schema)
        tiers = [[k for k in levels if levels[k] == level] for level in sorted(set(levels.values()), reverse=True)]
        return tiers, levels
    names = {schema.control_name if schema.slots else schema.ranker_name}
    value = _single(_control_results(annotation, names), annotation)
    if value is None:
        return [], {}
    if schema.kind == PAIRWISE:
        return pairwise_tiers(value), {}
    if schema.kind == BEST_OF_N:
        return best_of_n_tiers(value, schema, shown), {}
    return ranked_tiers(value, schema), {}


def _annotator(annotation: dict) -> int | None:
    who = annotation.get("completed_by")
    return who.get("id") if isinstance(who, dict) else who  # exports may inline the user object


def annotation_pairs(annotation: dict, task: dict, schema: RankingSchema, project_id: int) -> list[PreferencePair]:
    """The preference pairs of one annotation of `task` (its full Label Studio record)."""
    if annotation.get("was_cancelled"):
        return []
    data = task.get("data") or {}
    candidates = task_candidates(data, schema)
    if schema.kind == PAIRWISE:  # results say left/right; the slots say which tag is which side
        candidates = {side: candidates[s.name] for side, s in zip(SIDES, schema.slots) if s.name in candidates}
    tiers, levels = annotation_tiers(annotation, schema, list(candidates))
    named = [key for tier in tiers for key in tier]
    missing = sorted(set(named) - set(candidates))
    if missing:
        raise AnnotationError(
            f"annotation {annotation.get('id')} ranks candidates {missing} that task {task.get('id')} does not have"
        )
    if len(named) != len(set(named)):
        raise AnnotationError(f"annotation {annotation.get('id')} places a candidate twice: {named}")
    prompt = str(data.get(schema.prompt_field, ""))
    pairs = []
    for chosen_key, rejected_key in pairs_from_tiers(tiers):
        chosen, rejected = candidates[chosen_key], candidates[rejected_key]
        if str(chosen.get("body", "")) == str(rejected.get("body", "")):
            continue
        pairs.append(PreferencePair(
            project_id=project_id,
            task_id=int(task["id"]),
            annotator=_annotator(annotation),
            prompt=prompt,
            chosen=str(chosen.get("body", "")),
            rejected=str(rejected.get("body", "")),
            margin=levels[chosen_key] - levels[rejected_key] if levels else 0.0,
            chosen_policy_version=chosen.get("policy_version"),
            rejected_policy_version=rejected.get("policy_version"),
            annotation_id=annotation.get("id"),
            chosen_id=str(chosen.get("id", chosen_key)),
            rejected_id=str(rejected.get("id", rejected_key)),
        ))
    return pairs
