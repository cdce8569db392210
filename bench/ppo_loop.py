"""The whole loop against simulated annotators: does RL on a fitted reward model improve the policy?

In:  the real default models (SmolLM2-135M-Instruct policy, MiniLM reward encoder), a list of
     short questions, and scripted annotators that rank candidates by a fixed hidden preference.
Out: per preference, a markdown row: rollout tokens/s, seconds per RL update, peak memory,
     the reward model's held-out accuracy, the new policy's win-rate against the base policy by
     that preference (with the sign-test p-value), the KL between them, and the mean per-token
     NLL under the base policy of the new answers against the base policy's own answers.

For each hidden preference:
1. the base policy writes K candidates for each training question; the annotator ranks them by
   the preference (equal scores tie: one bucket, no pair), giving preference pairs;
2. the default reward model (frozen MiniLM + Bradley-Terry head) is fitted on those pairs;
3. the backend's RL algorithm (backend/rl.py: our PPO by default, `--algorithm rloo|grpo` for trl's)
   trains the policy against the reward model;
4. on held-out questions the new and the base policy each sample answers; the win-rate counts
   how often the preference favours the new answer (ties half), paired by question and sample.

Run: `.venv/bin/python bench/ppo_loop.py` (about 4 minutes per preference on 2 cores with PPO, about 6 minutes
and 3x the memory with RLOO; `--help` for the knobs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from backend.evaluation import (  # noqa: E402
    held_out_nll,
    paired_prompt_difference,
    sampled_kl,
    should_publish,
    sign_test_p_value,
    tally,
)
from backend.generation import sample_completions  # noqa: E402
from backend.models import (  # noqa: E402
    DEFAULT_ENCODER,
    DEFAULT_POLICY,
    load_causal_lm,
    load_encoder,
    resolve_encoder,
    resolve_policy,
)
from backend.dpo import DPOConfig  # noqa: E402
from backend.ppo import PPOConfig  # noqa: E402
from backend.preferences import pairs_from_tiers  # noqa: E402
from backend.reward import RewardModel, TextEncoder  # noqa: E402
from backend.reward_training import wilson_interval  # noqa: E402
from backend.rl import ALGORITHMS, StepStats, improve_policy, normalised_to_candidates  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.worker import dpo_config  # noqa: E402
from preference_suite import PREFERENCES, SUITE, VERDICTS, verdict  # noqa: E402

log = logging.getLogger("ppo_loop")

# Questions where a number is the natural answer, and questions where it is not: the hidden
# "contains a number" preference then has something to find in both kinds.
NUMERIC = [
    "How many legs does a spider have?", "How many days are in a leap year?", "What is 12 times 12?",
    "How many continents are there?", "At what temperature does water boil in Celsius?",
    "How many minutes are in an hour?", "How many players are on a soccer team?", "What year did World War II end?",
    "How many sides does a hexagon have?", "How many planets are in the solar system?",
    "How many strings does a guitar usually have?", "What is the square root of 81?",
    "How many hours are in a week?", "How many bones does an adult human have?", "How many weeks are in a year?",
    "How old do you have to be to vote in the US?", "How many keys does a piano have?",
    "What is half of 250?", "How many months have 31 days?", "How many teeth does an adult have?",
    "How many ounces are in a pound?", "How many centimeters are in a meter?", "How many states are in the USA?",
    "How long is a marathon?", "How many cups are in a gallon?", "How many hearts does an octopus have?",
    "What is 15 plus 27?", "How many seconds are in a day?", "How many colors are in a rainbow?",
    "How many zeros are in a million?",
]
OPEN = [
    "Why is the sky blue?", "What is your favorite color?", "How do I make a cup of tea?",
    "What is photosynthesis?", "Can you recommend a good book?", "Why do cats purr?",
    "How can I sleep better?", "What is the capital of France?", "Tell me about dolphins.",
    "How do I stay motivated?", "What makes a good friend?", "Describe the ocean.",
    "How do airplanes fly?", "What should I cook for dinner?", "Why do leaves change color?",
    "Give me a tip for learning a language.", "What is a rainbow?", "How do I water a cactus?",
    "What do bees do?", "How can I be more productive?", "What is gravity?", "Write a short greeting.",
    "What is the moon made of?", "How do I tie a tie?", "What is music?", "Why do we dream?",
    "How do I start running?", "What is the internet?", "Name a fruit.", "How do I calm down?",
]
# Training questions only (the held-out ones stay those above): for runs with 3x the signal per seed
# (bench/suite.py --more-questions), to tell a taste that needs more rankings from one PPO cannot learn.
MORE_NUMERIC = [
    "How many wheels does a tricycle have?", "How many eggs are in a dozen?", "What is 9 times 7?",
    "How many days are in a week?", "How many sides does a triangle have?", "What is 100 minus 37?",
    "How many legs does an insect have?", "How many players are on a basketball court per team?",
    "How many grams are in a kilogram?", "What year did humans first land on the moon?",
    "How many letters are in the English alphabet?", "How many inches are in a foot?",
    "What is 3 squared?", "How many chambers does the human heart have?", "How many feet are in a mile?",
    "How many hours are in a day?", "How many cards are in a deck?", "How many sides does an octagon have?",
    "What is 20 percent of 50?", "How many years are in a century?", "How many lungs does a person have?",
    "How many quarters make a dollar?", "At what temperature does water freeze in Fahrenheit?",
    "How many moons does Mars have?", "How many minutes are in a soccer match?", "What is 64 divided by 8?",
    "How many pints are in a quart?", "How many squares are on a chessboard?", "How many oceans are there?",
    "How many wings does a bee have?", "How many days are in February in a leap year?",
    "How many milliliters are in a liter?", "How many senators does each US state have?",
    "What is 5 factorial?", "How many toes does a cat usually have on its front paws?",
    "How many kilometers are in a mile, roughly?",
]
MORE_OPEN = [
    "Why do birds sing?", "What is your favorite season?", "How do I make pancakes?", "What is a volcano?",
    "Can you suggest a hobby?", "Why do dogs wag their tails?", "How can I focus better?",
    "What is the capital of Japan?", "Tell me about owls.", "How do I make new friends?",
    "What makes a good teacher?", "Describe a forest.", "How do boats float?", "What should I read next?",
    "Why does it rain?", "Give me a tip for public speaking.", "What is a cloud?", "How do I care for a fern?",
    "What do ants eat?", "How can I save money?", "What is electricity?", "Write a short thank-you note.",
    "What is the sun made of?", "How do I fold a paper plane?", "What is art?", "Why do we yawn?",
    "How do I start meditating?", "What is a computer?", "Name a vegetable.", "How do I relax after work?",
    "What is friendship?", "Why is the sea salty?", "How do I plant a tree?", "What is a desert?",
    "How can I learn to draw?", "Describe a sunset.",
]


def split_prompts(n_held_out: int) -> tuple[list[str], list[str]]:
    """(train, held-out): the last n_held_out / 2 questions of each kind are held out."""
    half = n_held_out // 2
    return NUMERIC[:-half] + OPEN[:-half], NUMERIC[-half:] + OPEN[-half:]


# ----------------------------------------------------------------------------- simulated annotators

ANNOTATIONS = VERDICTS


def annotate(prompts: list[str], candidates: list[list[str]], preference: Callable[[str], float],
             annotation: str = "tiers"):
    """The scripted annotator's `verdict` on every prompt, as the (prompts, chosen, rejected) of every
    pair it implies (backend/preferences.py rules)."""
    out_prompts, chosen, rejected = [], [], []
    for prompt, bodies in zip(prompts, candidates):
        for better, worse in pairs_from_tiers(verdict(bodies, preference, annotation)):
            out_prompts.append(prompt)
            chosen.append(bodies[better])
            rejected.append(bodies[worse])
    return out_prompts, chosen, rejected


# ----------------------------------------------------------------------------- one experiment


@dataclass
class Knobs:
    candidates: int = 8  # candidates per training prompt that the annotator ranks
    annotation: str = "tiers"  # how the annotator expresses its verdict (`verdict`)
    # how many training questions the annotator ranks (a seeded sample of them; None = all); the update still
    # trains on every training question, as the worker trains on every prompt of a project, ranked or not
    ranked_questions: int | None = None
    candidate_tokens: int = 32  # MAX_NEW_TOKENS of those candidates
    # answers per held-out prompt and policy; with 2, a sparse taste (contains_number) separated 3 pairs of
    # base answers, too few to show the reward model better than chance (PPO_MIN_RM_ACCURACY)
    eval_samples: int = 4
    held_out: int = 24  # held-out prompts
    algorithm: str = Settings.model_fields["rl_algorithm"].default  # RL_ALGORITHM: the backend's default
    group_size: int = Settings.model_fields["rl_group_size"].default  # samples per prompt of GRPO/RLOO
    # PPO_TRIGGER_PAIRS: run_loop updates only once this many pairs are newer than its last attempt
    trigger_pairs: int = Settings.model_fields["ppo_trigger_pairs"].default
    # this regime's own PPO knobs, as its seed tables in docs/ppo.md were measured (the KL budget is 4 here;
    # the backend's PPO_STOP_KL default is 8, chosen on bench/suite.py)
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(
        steps=16, batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=5e-4, lora_rank=16,
        max_new_tokens=32, init_kl_coef=0.02, target_kl=4.0, stop_kl=4.0,
        fluency_coef=Settings.model_fields["ppo_fluency_coef"].default))
    dpo: DPOConfig = field(default_factory=lambda: dpo_config(Settings()))  # DPO_*: the backend's defaults


@dataclass
class Result:
    preference: str
    pairs: int
    rm_held_out_accuracy: float  # on pairs of the base policy's held-out answers
    rm_held_out_pairs: int  # how many such pairs the preference separates
    rm_held_out_accuracy_low: float | None  # lower 95% Wilson bound: what PPO_MIN_RM_ACCURACY is held against
    algorithm: str
    ppo_steps: int  # RL steps whose updates the new policy holds
    seconds_per_update: float  # GRPO/RLOO: per step, rollout included (trl times only whole steps)
    rollout_tokens_per_s: float | None  # None for GRPO/RLOO
    final_train_kl: float | None  # the last rollout's KL, nats per sequence; None if not measured
    held_out_kl: float  # KL(new || base) on held-out answers, nats per answer
    wins: int
    losses: int
    ties: int
    win_rate: float
    p_value: float
    nll_base_answers: float  # under the base policy, nats per token
    nll_new_answers: float
    nll_rise_se: float  # standard error of the rise, paired by prompt: the guard rails' fluency check counts it
    reward_base: float  # mean reward-model score of held-out answers
    reward_new: float
    chars_base: float  # mean answer length in characters: shows whether a win came from length alone
    chars_new: float
    published: bool
    reason: str
    peak_rss_gb: float
    seconds: float
    samples: list[str] = field(default_factory=list)
    # per held-out answer pair (new against base at the same index), so that a publish rule can be judged
    # on stored rows without rerunning: the reward model's two scores and the taste's verdict (+1/0/-1)
    rm_scores_new: list[float] = field(default_factory=list)
    rm_scores_base: list[float] = field(default_factory=list)
    taste_verdicts: list[int] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # run_loop: each update's pairs, verdict and win-rate


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def sample(model, tokenizer, prompts, n, max_new_tokens) -> tuple[list[str], list[str], float]:
    """n answers per prompt, flattened prompt-major, with their prompts and the generation tokens/s."""
    started = time.perf_counter()
    answers = sample_completions(model, tokenizer, prompts, n, max_new_tokens, batch_size=8)
    seconds = time.perf_counter() - started
    flat = [a for group in answers for a in group]
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in flat)
    return [p for p in prompts for _ in range(n)], flat, tokens / seconds


def run_experiment(name: str, preference, base, tokenizer, encoder: TextEncoder, train_prompts: list[str],
                   candidates: list[list[str]], eval_prompts: list[str], base_answers: list[str],
                   knobs: Knobs, max_kl: float) -> Result:
    started = time.perf_counter()
    # annotate: the scripted annotator ranks the base policy's candidates
    ranked = ranked_sample(len(train_prompts), knobs.ranked_questions, knobs.ppo.seed)
    prompts, chosen, rejected = annotate([train_prompts[i] for i in ranked], [candidates[i] for i in ranked],
                                         preference, knobs.annotation)
    reward = fit_reward(encoder, prompts, chosen, rejected)
    right, judged = held_out_agreement(reward, eval_prompts, base_answers, preference)
    rm_accuracy = right / judged if judged else math.nan
    rm_accuracy_low = wilson_interval(right, judged)[0] if judged else None  # None: unknown, as in the product
    log.info("%s: %d pairs, reward model accuracy %.3f on %d held-out answer pairs", name, len(prompts),
             rm_accuracy, judged)
    # RL against the reward model, in units of the candidates the annotator saw
    reward_fn = normalised_to_candidates(reward.score, dict(zip(train_prompts, candidates)))
    torch.manual_seed(knobs.ppo.seed)
    new, stats = improve_policy(knobs.algorithm, base, tokenizer, train_prompts, reward_fn, knobs.ppo,
                                group_size=knobs.group_size, pairs=(prompts, chosen, rejected), dpo_config=knobs.dpo)
    log.info("%s: %s done at %.0fs", name, knobs.algorithm, time.perf_counter() - started)
    seconds_per_update, rollout_tps = step_timings(stats)
    # evaluate on held-out prompts: new answers against the base policy's, by the hidden preference
    torch.manual_seed(knobs.ppo.seed + 1)
    _, new_answers, _ = sample(new, tokenizer, eval_prompts[::knobs.eval_samples], knobs.eval_samples,
                               knobs.ppo.max_new_tokens)
    comparison = compare(new, base, tokenizer, reward, eval_prompts, new_answers, base_answers, knobs.eval_samples)
    # the reward model's accuracy stands in for the product's check on held-out human pairs
    published, reason = guard_rails(comparison, max_kl, rm_accuracy_low)
    return Result(
        preference=name, pairs=len(prompts), rm_held_out_accuracy=rm_accuracy, rm_held_out_pairs=judged,
        rm_held_out_accuracy_low=rm_accuracy_low, algorithm=knobs.algorithm,
        ppo_steps=len(stats), seconds_per_update=seconds_per_update, rollout_tokens_per_s=rollout_tps,
        final_train_kl=stats[-1].kl if stats else None, published=published, reason=reason,
        peak_rss_gb=peak_rss_gb(), seconds=time.perf_counter() - started,
        **judged_fields(comparison, preference, eval_prompts, new_answers, base_answers, knobs.eval_samples),
    )


@dataclass
class Comparison:
    """A new policy's held-out answers against an old policy's, as the guard rails measure them."""
    rewards_new: list[float]  # the reward model's score of each answer
    rewards_old: list[float]
    reward_se: float  # standard error of the mean reward difference, paired by prompt
    kl: float  # KL(new || old), nats per answer
    nll_new: float  # under the old policy, nats per token
    nll_old: float
    nll_rise_se: float


def compare(new, old, tokenizer, reward: RewardModel, eval_prompts: list[str], new_answers: list[str],
            old_answers: list[str], k: int) -> Comparison:
    rewards_new, rewards_old = reward.score(eval_prompts, new_answers), reward.score(eval_prompts, old_answers)
    _, reward_se = paired_prompt_difference(rewards_new, rewards_old, k)
    nll_new, nll_old, rise_se = held_out_nll(old, tokenizer, eval_prompts, new_answers, old_answers, k)
    return Comparison(rewards_new, rewards_old, reward_se, sampled_kl(new, old, tokenizer, eval_prompts, new_answers),
                      nll_new, nll_old, rise_se)


def guard_rails(c: Comparison, max_kl: float, rm_accuracy_low: float | None) -> tuple[bool, str]:
    """The worker's publish rule (`should_publish`) with the backend's default bounds."""
    defaults = Settings()
    return should_publish(c.kl, max_kl, sum(c.rewards_new) / len(c.rewards_new),
                          sum(c.rewards_old) / len(c.rewards_old), reward_se=c.reward_se,
                          rm_accuracy_low=rm_accuracy_low, min_rm_accuracy=defaults.ppo_min_rm_accuracy,
                          nll_rise=c.nll_new - c.nll_old, max_nll_rise=defaults.ppo_max_nll_rise,
                          nll_rise_se=c.nll_rise_se)


def judged_fields(c: Comparison, preference, eval_prompts: list[str], new_answers: list[str],
                  base_answers: list[str], k: int) -> dict:
    """The `Result` fields that judge new answers against the base policy's (`c` compares the two)."""
    t = tally(new_answers, base_answers, preference)
    return dict(
        held_out_kl=c.kl, wins=t.wins, losses=t.losses, ties=t.ties, win_rate=t.win_rate,
        p_value=sign_test_p_value(t.wins, t.losses), nll_base_answers=c.nll_old, nll_new_answers=c.nll_new,
        nll_rise_se=c.nll_rise_se, reward_base=sum(c.rewards_old) / len(c.rewards_old),
        reward_new=sum(c.rewards_new) / len(c.rewards_new), chars_base=mean_chars(base_answers),
        chars_new=mean_chars(new_answers),
        samples=[f"{p} -> {a}" for p, a in zip(eval_prompts[::k], new_answers[::k])][:6],
        rm_scores_new=[round(r, 4) for r in c.rewards_new], rm_scores_base=[round(r, 4) for r in c.rewards_old],
        taste_verdicts=[(preference(n) > preference(b)) - (preference(n) < preference(b))
                        for n, b in zip(new_answers, base_answers)],
    )


def run_loop(name: str, preference, base, tokenizer, encoder: TextEncoder, train_prompts: list[str],
             candidates: list[list[str]], eval_prompts: list[str], base_answers: list[str],
             knobs: Knobs, max_kl: float, rounds: int) -> Result:
    """The loop a user gets from the automatic trigger, in `rounds` updates instead of one.

    The annotator ranks the training questions in `rounds` batches (`loop_batches`). After each batch
    with at least `knobs.trigger_pairs` pairs newer than the last attempt (the worker's trigger; fewer
    carry over to the next batch) the reward model is refitted on every pair so far and the serving
    policy is updated from itself. The guard rails judge the update against the serving policy, as the
    worker does, and the reward model on the held-out answers of every policy served so far (the worker:
    on every held-out pair the project has, whichever policy wrote its candidates). A published update
    serves from then on and writes fresh candidates for the questions not ranked yet (the worker's
    regenerate job). The result judges the last serving policy against the base policy: what the
    annotators are left with, 0.5 if nothing was published. `rounds` in the row says how each round went.
    """
    started = time.perf_counter()
    k, tokens = knobs.eval_samples, knobs.ppo.max_new_tokens
    batches = loop_batches(len(train_prompts), rounds, knobs.ppo.seed)
    shown = dict(zip(train_prompts, candidates))  # the candidates each task holds now
    serving = base
    served_answers = [base_answers]  # held-out answers of every policy served so far: the project's held-out pairs
    prompts, chosen, rejected, all_stats, history = [], [], [], [], []
    attempted_at = 0  # pairs when the last update was attempted, published or refused
    for r, batch in enumerate(batches):
        batch_prompts = [train_prompts[i] for i in batch]
        p, c, j = annotate(batch_prompts, [shown[q] for q in batch_prompts], preference, knobs.annotation)
        prompts, chosen, rejected = prompts + p, chosen + c, rejected + j
        if len(prompts) - attempted_at < knobs.trigger_pairs:
            history.append(not_triggered(r + 1, len(prompts) - attempted_at, len(prompts), knobs.trigger_pairs))
            log.info("%s round %d: %s", name, r + 1, history[-1]["reason"])
            continue
        attempted_at = len(prompts)
        reward = fit_reward(encoder, prompts, chosen, rejected)
        right, judged, rm_accuracy_low = reward_check(reward, eval_prompts, served_answers, preference)
        torch.manual_seed(knobs.ppo.seed + r)
        new, stats = improve_policy(knobs.algorithm, serving, tokenizer, train_prompts,
                                    normalised_to_candidates(reward.score, shown), knobs.ppo,
                                    group_size=knobs.group_size, pairs=(prompts, chosen, rejected),
                                    dpo_config=knobs.dpo)
        all_stats += stats
        torch.manual_seed(knobs.ppo.seed + 1)
        _, new_answers, _ = sample(new, tokenizer, eval_prompts[::k], k, tokens)
        published, reason = guard_rails(compare(new, serving, tokenizer, reward, eval_prompts, new_answers,
                                                served_answers[-1], k), max_kl, rm_accuracy_low)
        t = tally(new_answers, base_answers, preference)
        history.append({"round": r + 1, "triggered": True, "pairs": len(prompts), "steps": len(stats),
                        "published": published, "reason": reason, "win_rate_vs_base": t.win_rate,
                        "wins": t.wins, "losses": t.losses,
                        "rm_held_out_accuracy": right / judged if judged else math.nan,
                        "rm_held_out_pairs": judged})
        log.info("%s round %d: %d pairs, %d steps, win %.3f against base, %s: %s", name, r + 1, len(prompts),
                 len(stats), t.win_rate, "published" if published else "refused", reason)
        if published and stats:
            serving = new
            served_answers.append(new_answers)
            unranked = [train_prompts[i] for later in batches[r + 1:] for i in later]
            torch.manual_seed(knobs.ppo.seed + 100 + r)
            shown.update(zip(unranked, sample_completions(serving, tokenizer, unranked, knobs.candidates,
                                                          knobs.candidate_tokens)))
    seconds_per_update, rollout_tps = step_timings(all_stats)
    if not attempted_at:  # never triggered: the base policy serves; the row's reward model is fitted on every pair
        reward = fit_reward(encoder, prompts, chosen, rejected)
        right, judged, rm_accuracy_low = reward_check(reward, eval_prompts, served_answers, preference)
    return Result(
        preference=name, pairs=len(prompts), rm_held_out_accuracy=right / judged if judged else math.nan,
        rm_held_out_pairs=judged, rm_held_out_accuracy_low=rm_accuracy_low, algorithm=knobs.algorithm,
        ppo_steps=len(all_stats), seconds_per_update=seconds_per_update, rollout_tokens_per_s=rollout_tps,
        final_train_kl=all_stats[-1].kl if all_stats else None,
        published=any(h["published"] for h in history),
        reason=" | ".join(f"round {h['round']}: {h['reason']}" if not h["triggered"] else
                          f"round {h['round']}: {'published' if h['published'] else 'refused'}, {h['reason']}"
                          for h in history),
        peak_rss_gb=peak_rss_gb(), seconds=time.perf_counter() - started, rounds=history,
        **judged_fields(compare(serving, base, tokenizer, reward, eval_prompts, served_answers[-1], base_answers, k),
                        preference, eval_prompts, served_answers[-1], base_answers, k),
    )


def fit_reward(encoder: TextEncoder, prompts: list[str], chosen: list[str], rejected: list[str]) -> RewardModel:
    """The default reward model (MiniLM and character n-gram heads) fitted on every pair, with no margins."""
    return RewardModel(encoder).fit(prompts, chosen, rejected, [0.0] * len(prompts)).model


def reward_check(reward: RewardModel, eval_prompts: list[str], answer_sets: list[list[str]],
                 preference) -> tuple[int, int, float | None]:
    """(agreeing, judged, lower 95% bound of the accuracy) of `held_out_agreement` over every set of answers:
    the guard rails' reward-model check (None: no pair judged, unknown, as in the product)."""
    right, judged = map(sum, zip(*(held_out_agreement(reward, eval_prompts, a, preference) for a in answer_sets)))
    return right, judged, wilson_interval(right, judged)[0] if judged else None


def not_triggered(round_: int, new_pairs: int, pairs: int, trigger_pairs: int) -> dict:
    """A `run_loop` round without an update: too few new pairs for the trigger."""
    return {"round": round_, "triggered": False, "pairs": pairs, "steps": 0, "published": False,
            "reason": f"not triggered: {new_pairs} new pairs < PPO_TRIGGER_PAIRS {trigger_pairs}"}


def loop_batches(questions: int, rounds: int, seed: int) -> list[list[int]]:
    """The training questions in a seeded order, cut into `rounds` batches of (nearly) equal size: the
    questions the annotator ranks before each update of `run_loop`."""
    if not 1 <= rounds <= questions:
        raise ValueError(f"rounds={rounds} is invalid: give 1 to {questions} (one update per batch of questions)")
    order = list(range(questions))
    random.Random(seed).shuffle(order)
    return [sorted(order[r * questions // rounds:(r + 1) * questions // rounds]) for r in range(rounds)]


def ranked_sample(questions: int, ranked: int | None, seed: int) -> list[int]:
    """The indices of the questions the annotator ranks: all of them, or a sample of `ranked` drawn with `seed`."""
    if ranked is None or ranked >= questions:
        return list(range(questions))
    return sorted(random.Random(seed).sample(range(questions), ranked))


def step_timings(stats: list[StepStats]) -> tuple[float, float | None]:
    """Mean seconds per update and rollout tokens/s. Only PPO times its rollouts apart from its
    updates; for GRPO/RLOO the seconds are whole steps' and the tokens/s unknown."""
    if not stats:
        return math.nan, None
    if "rollout_seconds" not in stats[0].extra:
        return sum(s.seconds for s in stats) / len(stats), None
    rollout_seconds = sum(s.extra["rollout_seconds"] for s in stats)
    update_seconds = sum(s.seconds for s in stats) - rollout_seconds
    return update_seconds / len(stats), sum(s.extra["response_tokens"] for s in stats) / rollout_seconds


def mean_chars(answers: list[str]) -> float:
    return sum(map(len, answers)) / len(answers)


def held_out_agreement(reward: RewardModel, prompts: list[str], answers: list[str], preference) -> tuple[int, int]:
    """(agreeing, judged): how often the reward model orders a pair of answers to one prompt as the
    preference does, over every such pair the preference separates."""
    by_prompt: dict[str, list[str]] = {}
    for p, a in zip(prompts, answers):
        by_prompt.setdefault(p, []).append(a)
    right = total = 0
    for p, group in by_prompt.items():
        scores = reward.score([p] * len(group), group)
        for i in range(len(group)):
            for j in range(len(group)):
                if preference(group[i]) > preference(group[j]):
                    total += 1
                    right += scores[i] > scores[j]
    return right, total


# ----------------------------------------------------------------------------- report


def markdown(results: list[Result], generation_tps: float) -> str:
    head = ("| preference | pairs | RM acc. | algorithm, steps | s / update | rollout tok/s | KL train (nats/seq) | "
            "KL held-out (nats/ans) | win-rate (W/L/T) | p | NLL base -> new (nats/tok) | RM reward base -> new | "
            "chars base -> new | publish | peak RSS |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        rows.append(
            f"| {r.preference} | {r.pairs} | {r.rm_held_out_accuracy:.2f} | {r.algorithm}, {r.ppo_steps} | "
            f"{r.seconds_per_update:.1f} | {optional(r.rollout_tokens_per_s, '.0f')} | "
            f"{optional(r.final_train_kl, '.2f')} | {r.held_out_kl:.2f} | "
            f"{r.win_rate:.3f} ({r.wins}/{r.losses}/{r.ties}) | {r.p_value:.3g} | "
            f"{r.nll_base_answers:.2f} -> {r.nll_new_answers:.2f} ({r.nll_new_answers - r.nll_base_answers:+.2f}) | "
            f"{r.reward_base:.2f} -> {r.reward_new:.2f} | {r.chars_base:.0f} -> {r.chars_new:.0f} | {'yes' if r.published else 'no'} | {r.peak_rss_gb:.1f} GB |"
        )
    rows.append(f"\nBase policy generation (held-out answers): {generation_tps:.0f} tokens/s.")
    return "\n".join(rows)


def optional(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}, fp32")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preferences", nargs="+", default=list(PREFERENCES), choices=list(PREFERENCES))
    parser.add_argument("--algorithm", choices=ALGORITHMS, default=Knobs().algorithm, help="RL_ALGORITHM")
    parser.add_argument("--steps", type=int, default=Knobs().ppo.steps)
    parser.add_argument("--lr", type=float, default=Knobs().ppo.learning_rate)
    parser.add_argument("--kl-coef", type=float, default=Knobs().ppo.init_kl_coef)
    parser.add_argument("--max-new-tokens", type=int, default=Knobs().ppo.max_new_tokens)
    parser.add_argument("--lora-rank", type=int, default=Knobs().ppo.lora_rank)
    parser.add_argument("--batch-size", type=int, default=Knobs().ppo.batch_size)
    parser.add_argument("--fluency-coef", type=float, default=Knobs().ppo.fluency_coef)
    parser.add_argument("--stop-kl", type=float, default=Knobs().ppo.stop_kl)
    parser.add_argument("--max-kl", type=float, default=12.0, help="PPO_MAX_KL of the guard rail, nats per answer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppo-epochs", type=int, default=Knobs().ppo.ppo_epochs)
    parser.add_argument("--seed", type=int, default=Knobs().ppo.seed, help="seed of PPO and of the evaluation samples")
    parser.add_argument("--annotation", choices=ANNOTATIONS, default=Knobs().annotation,
                        help="tiers: equal answers tie; ranker: Label Studio's ranker (no ties); buckets: 3 buckets")
    parser.add_argument("--samples", type=Path, help="cache of the base policy's candidates and held-out answers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    base_knobs = Knobs()
    ppo = PPOConfig(**{**asdict(base_knobs.ppo), "steps": args.steps, "learning_rate": args.lr,
                       "init_kl_coef": args.kl_coef, "max_new_tokens": args.max_new_tokens,
                       "lora_rank": args.lora_rank, "batch_size": args.batch_size, "stop_kl": args.stop_kl,
                       "fluency_coef": args.fluency_coef,
                       "ppo_epochs": args.ppo_epochs, "seed": args.seed,
                       "mini_batch_size": min(base_knobs.ppo.mini_batch_size, args.batch_size)})
    knobs = Knobs(ppo=ppo, annotation=args.annotation, algorithm=args.algorithm)
    started = time.perf_counter()

    base, tokenizer = load_causal_lm(resolve_policy(DEFAULT_POLICY, ROOT / ".cache"))
    encoder_model, encoder_tokenizer = load_encoder(resolve_encoder(DEFAULT_ENCODER))
    encoder = TextEncoder(encoder_model, encoder_tokenizer, DEFAULT_ENCODER, store=None)
    train_prompts, held_out = split_prompts(knobs.held_out)
    # candidates the annotators rank, and the base policy's held-out answers: shared by every preference.
    # The cache records what they were drawn with: one of other knobs would misalign prompts and answers.
    sampling = {"candidates": knobs.candidates, "candidate_tokens": knobs.candidate_tokens,
                "eval_samples": knobs.eval_samples, "eval_tokens": knobs.ppo.max_new_tokens}
    cached = json.loads(args.samples.read_text()) if args.samples and args.samples.exists() else {}
    if cached.get("sampling") == sampling:  # a rerun with other PPO knobs skips the base policy's sampling
        candidates, eval_prompts, base_answers = cached["candidates"], cached["eval_prompts"], cached["base_answers"]
        generation_tps = cached["generation_tps"]
    else:
        if cached:
            log.info("%s was sampled with %s, not %s: sampling again", args.samples, cached.get("sampling"), sampling)
        torch.manual_seed(0)
        candidates = sample_completions(base, tokenizer, train_prompts, knobs.candidates, knobs.candidate_tokens)
        log.info("%d candidates in %.0fs", knobs.candidates * len(train_prompts), time.perf_counter() - started)
        torch.manual_seed(1)
        eval_prompts, base_answers, generation_tps = sample(base, tokenizer, held_out, knobs.eval_samples,
                                                            knobs.ppo.max_new_tokens)
        if args.samples:
            args.samples.write_text(json.dumps({"sampling": sampling, "candidates": candidates,
                                                "eval_prompts": eval_prompts, "base_answers": base_answers,
                                                "generation_tps": generation_tps}))
    log.info("candidates and base answers in %.0fs (%.0f tokens/s)", time.perf_counter() - started, generation_tps)

    results = []
    for name in args.preferences:
        results.append(run_experiment(name, PREFERENCES[name], base, tokenizer, encoder, train_prompts, candidates,
                                      eval_prompts, base_answers, knobs, args.max_kl))
        log.info("%s", json.dumps(asdict(results[-1]), indent=1))

    print(f"## {knobs.algorithm} against simulated annotators ({len(held_out)} held-out prompts x "
          f"{knobs.eval_samples} samples)\n")
    print(markdown(results, generation_tps))
    print(f"\n{knobs.algorithm}: {ppo}\nMachine: {machine()}. Total {time.perf_counter() - started:.0f}s.")
    if args.json:
        args.json.write_text(json.dumps({"ppo": asdict(ppo), "machine": machine(),
                                         "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
