"""Agreement: preference pairs from several annotators in, how often they order candidates alike out.

- `pairwise_agreement`: over every task that two or more annotators judged, every two annotators
  and every candidate pair both of them ordered, the fraction they ordered the same way. Pairs
  either left tied or unranked count for neither. Pass one project's pairs for its agreement.
- `annotator_consistency`: for each annotator, the fraction of the candidate pairs they ordered
  that agree with the majority of the other annotators who ordered them; pairs where the others
  split evenly are skipped.
Candidates are told apart by `chosen_id`/`rejected_id` when the pairs carry them, else by text.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

from backend.preferences import pair_field

# task id -> annotator -> {frozenset({a, b}): winner}
Orders = dict[int, dict[int | None, dict[frozenset, str]]]


@dataclass(frozen=True)
class Agreement:
    rate: float | None  # fraction in agreement; None when nothing could be compared
    compared: int  # candidate pairs compared


def orders(pairs: Iterable) -> Orders:
    """Who preferred what: each annotator's winner of each candidate pair, per task.

    An annotator who ordered one pair both ways on one task (two annotations) has no order for it.
    """
    result: Orders = defaultdict(lambda: defaultdict(dict))
    contradicted: set[tuple] = set()
    for pair in pairs:
        chosen = pair_field(pair, "chosen_id") or pair_field(pair, "chosen")
        rejected = pair_field(pair, "rejected_id") or pair_field(pair, "rejected")
        task, annotator, key = pair_field(pair, "task_id"), pair_field(pair, "annotator"), frozenset((chosen, rejected))
        known = result[task][annotator].get(key)
        if known is not None and known != chosen:
            contradicted.add((task, annotator, key))
        result[task][annotator][key] = chosen
    for task, annotator, key in contradicted:
        del result[task][annotator][key]
    return result


def _rate(agreed: int, compared: int) -> Agreement:
    return Agreement(rate=agreed / compared if compared else None, compared=compared)


def pairwise_agreement(pairs: Iterable) -> Agreement:
    """Fraction of candidate pairs two annotators both ordered that they ordered the same way."""
    agreed = compared = 0
    for by_annotator in orders(pairs).values():
        for first, second in combinations(by_annotator.values(), 2):
            for key in first.keys() & second.keys():
                compared += 1
                agreed += first[key] == second[key]
    return _rate(agreed, compared)


def annotator_consistency(pairs: Iterable) -> dict[int | None, Agreement]:
    """Each annotator's agreement with the majority of the other annotators of the same tasks."""
    counts: dict[int | None, list[int]] = defaultdict(lambda: [0, 0])  # annotator -> [agreed, compared]
    for by_annotator in orders(pairs).values():
        for annotator, mine in by_annotator.items():
            for key, winner in mine.items():
                others = [theirs[key] for who, theirs in by_annotator.items() if who != annotator and key in theirs]
                backing = sum(w == winner for w in others)
                if not others or 2 * backing == len(others):
                    continue
                counts[annotator][1] += 1
                counts[annotator][0] += 2 * backing > len(others)
    return {annotator: _rate(agreed, compared) for annotator, (agreed, compared) in counts.items()}
