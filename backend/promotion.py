"""Human-gated promotion: a policy that passed the automatic checks in, the annotators' verdict out.

With POLICY_PROMOTION=human a new policy version is recorded but does not serve ("pending") until the
annotators prefer it. PROMOTION_COMPARISONS held-out prompts become tasks of the project, each showing
one answer of the new policy and one of the serving policy, in a shuffled order, nothing telling them
apart (no prediction pre-orders them). Their rankings arrive through the same webhooks and become
preference pairs like any other; the verdict counts, per annotation of a comparison task, whose answer
was preferred (an annotation that gives no pair is a tie), with the exact sign test, curtailed: promote
once the new policy has won significantly whatever the outstanding comparisons say, refuse once it no
longer can. Curtailing decides early without the false wins of testing after every answer.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from backend.evaluation import sign_test_p_value
from backend.labelconfig import RankingSchema

# task data key of a comparison task: {"candidate": new version, "serving": the version it is judged against}
PROMOTION_FIELD = "rlhf_promotion"
ALPHA = 0.05  # one-sided significance of the annotators' preference for the new policy


@dataclass(frozen=True)
class Verdict:
    wins: int  # annotations preferring the new policy's answer
    losses: int  # ... the serving policy's
    ties: int  # annotations that gave no pair between the two
    outstanding: int  # comparison tasks nobody has annotated yet
    decision: str  # "promote", "refuse" or "wait"

    @property
    def p_value(self) -> float:
        return sign_test_p_value(self.wins, self.losses)

    def describe(self) -> str:
        return (f"annotators preferred it in {self.wins}, the serving policy in {self.losses} of their blind "
                f"comparisons ({self.ties} ties, {self.outstanding} outstanding; sign test p={self.p_value:.3f})")


def decide(wins: int, losses: int, ties: int, outstanding: int, alpha: float = ALPHA) -> Verdict:
    """Promote when even losing every outstanding comparison leaves a significant win; refuse when even
    winning all of them would not; otherwise wait for more answers."""
    if sign_test_p_value(wins, losses + outstanding) < alpha:
        decision = "promote"
    elif sign_test_p_value(wins + outstanding, losses) >= alpha:
        decision = "refuse"
    else:
        decision = "wait"
    return Verdict(wins, losses, ties, outstanding, decision)


def comparison_tasks(schema: RankingSchema, prompts: list[str], new_answers: list[str], serving_answers: list[str],
                     candidate: int, serving: int, seed: int) -> list[dict]:
    """Label Studio tasks (`{"data": ...}`) putting each prompt's two answers side by side, sides shuffled."""
    rng = random.Random(seed)
    tasks = []
    for prompt, new, old in zip(prompts, new_answers, serving_answers, strict=True):
        answers = [(new, candidate), (old, serving)]
        rng.shuffle(answers)
        generation = uuid.uuid4().hex[:8]
        items = [{"id": f"{generation}-{k}", "title": f"Answer {k + 1}", "body": body, "policy_version": version}
                 for k, (body, version) in enumerate(answers)]
        data = {schema.prompt_field: prompt, **schema.candidate_data(items),
                PROMOTION_FIELD: {"candidate": candidate, "serving": serving}}
        tasks.append({"data": data})
    return tasks


def tally(outcomes: dict[int, list[list[tuple[int | None, int | None]]]], task_ids: list[int],
          candidate: int) -> Verdict:
    """`outcomes`: comparison task -> its live annotations -> their pairs' (chosen, rejected) policy versions."""
    wins = losses = ties = outstanding = 0
    for task_id in task_ids:
        annotations = outcomes.get(task_id, [])
        outstanding += not annotations
        for pairs in annotations:
            if any(chosen == candidate for chosen, _ in pairs):
                wins += 1
            elif any(rejected == candidate for _, rejected in pairs):
                losses += 1
            else:
                ties += 1
    return decide(wins, losses, ties, outstanding)
