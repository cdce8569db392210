"""Tests of backend/evaluation.py against hand-computed values: win-rates, the sign test, NLL and
KL under stub models with known distributions, and the publish guard rail."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from backend.evaluation import (
    Tally,
    answer_logprobs,
    answer_nll,
    compare_on_held_out,
    paired_prompt_difference,
    sampled_kl,
    should_publish,
    sign_test_p_value,
    tally,
    win_rate,
)
from backend.models import load_causal_lm


def has_digit(answer: str) -> float:
    return float(bool(re.search(r"\d", answer)))


# ----------------------------------------------------------------------------- win-rates


def test_win_rate_counts_ties_as_half():
    # scores new [1, 0, 1] vs base [0, 0, 1]: one win, two ties -> (1 + 2 / 2) / 3
    assert win_rate(["7 days", "a week", "12"], ["a week", "seven", "3"], has_digit) == pytest.approx(2 / 3)


def test_tally_counts_wins_losses_and_ties_pairwise():
    assert tally(["1", "a", "b", "2"], ["a", "1", "c", "3"], has_digit) == Tally(wins=1, losses=1, ties=2)


def test_win_rate_of_identical_answers_is_one_half():
    assert win_rate(["a", "1"], ["a", "1"], has_digit) == 0.5


def test_tally_rejects_unpaired_answers():
    with pytest.raises(ValueError, match="2 new answers but 1 base answers"):
        tally(["a", "b"], ["a"], has_digit)


def test_sign_test_p_value_matches_binomial_tail():
    assert sign_test_p_value(5, 0) == pytest.approx(1 / 32)  # all five flips heads
    assert sign_test_p_value(3, 2) == pytest.approx((10 + 5 + 1) / 32)  # P(X >= 3), X ~ Bin(5, 1/2)
    assert sign_test_p_value(0, 0) == 1.0


# ----------------------------------------------------------------------------- likelihoods


class FixedDistributionLM(nn.Module):
    """A stub causal LM whose next-token distribution is `probs` (V,) at every position."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = probs.log()

    @property
    def device(self) -> torch.device:  # as a PreTrainedModel has: evaluation moves its inputs there
        return self.log_probs.device

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        b, length = input_ids.shape
        return SimpleNamespace(logits=self.log_probs.expand(b, length, -1).clone())  # (b, L, V)


@pytest.fixture(scope="module")
def tokenizer(tiny_policy):
    return load_causal_lm(str(tiny_policy))[1]


def test_answer_nll_under_uniform_model_is_log_vocabulary_size(tokenizer):
    vocab = len(tokenizer)
    uniform = FixedDistributionLM(torch.full((vocab,), 1 / vocab))
    nll = answer_nll(uniform, tokenizer, ["Tell me a joke.", "Name a number."], ["Why did the chicken", "42"])
    assert nll == pytest.approx(math.log(vocab), rel=1e-5)


def test_answer_logprobs_scores_only_answer_tokens_and_empty_answers_score_nothing(tokenizer):
    vocab = len(tokenizer)
    uniform = FixedDistributionLM(torch.full((vocab,), 1 / vocab))
    answers = ["Paris is the capital", ""]
    sums, counts = answer_logprobs(uniform, tokenizer, ["What is the capital of France?"] * 2, answers)
    n = len(tokenizer(answers[0], add_special_tokens=False)["input_ids"])
    assert counts.tolist() == [n, 0]
    assert sums.tolist() == pytest.approx([-n * math.log(vocab), 0.0], rel=1e-5)


def test_sampled_kl_is_mean_log_ratio_per_answer(tokenizer):
    vocab = len(tokenizer)
    # new puts twice base's probability on every token an answer uses: log ratio log(2) per token
    answer = "Paris"
    used = set(tokenizer(answer, add_special_tokens=False)["input_ids"])
    base_p = torch.full((vocab,), 1 / vocab)
    new_p = base_p.clone()
    for t in used:
        new_p[t] *= 2
    new_p[[t for t in range(vocab) if t not in used]] *= (1 - 2 * len(used) / vocab) / (1 - len(used) / vocab)
    n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    kl = sampled_kl(FixedDistributionLM(new_p), FixedDistributionLM(base_p), tokenizer, ["Capital?"], [answer])
    assert kl == pytest.approx(n * math.log(2), rel=1e-4)


def test_answer_nll_of_only_empty_answers_raises(tokenizer):
    uniform = FixedDistributionLM(torch.full((len(tokenizer),), 1 / len(tokenizer)))
    with pytest.raises(ValueError, match="every answer is empty"):
        answer_nll(uniform, tokenizer, ["a"], [""])


# ----------------------------------------------------------------------------- guard rail


def test_should_publish_accepts_small_kl_and_higher_reward():
    ok, reason = should_publish(2.0, 10.0, held_out_reward_new=0.5, held_out_reward_old=0.1)
    assert ok and "KL 2.000 <= 10.000" in reason


def test_should_publish_refuses_kl_above_max():
    ok, reason = should_publish(12.5, 10.0, held_out_reward_new=0.5, held_out_reward_old=0.1)
    assert not ok and "final KL 12.500 > PPO_MAX_KL 10.000" in reason


def test_should_publish_refuses_fallen_held_out_reward():
    ok, reason = should_publish(1.0, 10.0, held_out_reward_new=0.2, held_out_reward_old=0.3)
    assert not ok and "no gain shown: held-out reward 0.3000 -> 0.2000" in reason


def test_should_publish_refuses_an_unchanged_held_out_reward():
    ok, reason = should_publish(1.0, 10.0, held_out_reward_new=0.3, held_out_reward_old=0.3)
    assert not ok and "no gain shown" in reason


def test_should_publish_refuses_a_gain_within_the_noise_of_the_held_out_answers_but_not_beyond():
    # a gain of 0.1: within 1.64 standard errors of 0.07 (0.1148), beyond 1.64 x 0.05 (0.082)
    ok, reason = should_publish(1.0, 10.0, held_out_reward_new=0.4, held_out_reward_old=0.3, reward_se=0.07)
    assert not ok and "gain +0.1000 - noise 0.1148 <= PPO_MIN_REWARD_GAIN 0.0000" in reason
    ok, reason = should_publish(1.0, 10.0, held_out_reward_new=0.4, held_out_reward_old=0.3, reward_se=0.05)
    assert ok and "(+-0.0500)" in reason


def test_should_publish_needs_the_gain_to_pass_the_minimum_gain_and_a_negative_one_tolerates_a_fall():
    assert not should_publish(1.0, 10.0, 0.45, 0.3, min_reward_gain=0.2)[0]
    assert should_publish(1.0, 10.0, 0.55, 0.3, min_reward_gain=0.2)[0]
    assert should_publish(1.0, 10.0, 0.25, 0.3, min_reward_gain=-0.1)[0]


def test_paired_prompt_difference_averages_per_prompt_and_measures_the_spread_between_prompts():
    # 3 prompts x 2 answers; per-prompt differences (new - old): (3+5)/2-(1+1)/2 = 3, 0 - 0 = 0, (2+2)/2-(2+0)/2 = 1
    new, old = [3.0, 5.0, 0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 0.0, 0.0, 2.0, 0.0]
    mean, se = paired_prompt_difference(new, old, samples=2)
    assert mean == pytest.approx(4 / 3)
    # sample variance of (3, 0, 1) around 4/3: (25/9 + 16/9 + 1/9) / 2 = 7/3; se = sqrt(7/3 / 3)
    assert se == pytest.approx(math.sqrt(7 / 9))
    assert paired_prompt_difference([2.0, 4.0], [1.0, 1.0], samples=2) == (2.0, 0.0)  # one prompt: no spread


@pytest.mark.parametrize("new, old, samples", [([1.0, 2.0], [1.0], 1), ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 2), ([], [], 1)])
def test_paired_prompt_difference_rejects_scores_that_do_not_pair_up_by_prompt(new, old, samples):
    with pytest.raises(ValueError, match="score"):
        paired_prompt_difference(new, old, samples)


def test_should_publish_refuses_a_reward_model_not_shown_better_than_chance_but_not_an_unknown_one():
    ok, reason = should_publish(1.0, 10.0, 0.5, 0.1, rm_accuracy_low=0.49, min_rm_accuracy=0.5)
    assert not ok and "PPO_MIN_RM_ACCURACY" in reason and "0.490" in reason
    assert should_publish(1.0, 10.0, 0.5, 0.1, rm_accuracy_low=0.51, min_rm_accuracy=0.5)[0]
    assert should_publish(1.0, 10.0, 0.5, 0.1, rm_accuracy_low=None, min_rm_accuracy=0.5)[0]


def test_should_publish_refuses_non_finite_kl():
    ok, reason = should_publish(float("nan"), 10.0, 0.5, 0.1)
    assert not ok and "diverged" in reason


def test_should_publish_refuses_answers_whose_nll_rose_past_the_bound():
    ok, reason = should_publish(1.0, 10.0, 0.5, 0.1, nll_rise=0.7, max_nll_rise=0.5)
    assert not ok and "PPO_MAX_NLL_RISE" in reason
    assert should_publish(1.0, 10.0, 0.5, 0.1, nll_rise=0.4, max_nll_rise=0.5)[0]


def test_should_publish_counts_the_noise_of_the_nll_rise_against_the_new_policy():
    # 0.40 + 1.64 * 0.10 = 0.564 > 0.5: within the bound as a point estimate, but not shown to be
    ok, reason = should_publish(1.0, 10.0, 0.5, 0.1, nll_rise=0.4, max_nll_rise=0.5, nll_rise_se=0.1)
    assert not ok and "rose 0.400 + noise 0.164 nats/token > PPO_MAX_NLL_RISE 0.500" in reason
    ok, reason = should_publish(1.0, 10.0, 0.5, 0.1, nll_rise=0.2, max_nll_rise=0.5, nll_rise_se=0.1)
    assert ok and "NLL rise +0.200 (+-0.100)" in reason


def test_compare_on_held_out_measures_the_nll_rise_of_the_new_answers_and_its_spread_over_prompts(tiny_policy):
    old, tokenizer = load_causal_lm(str(tiny_policy))
    new, _ = load_causal_lm(str(tiny_policy))
    with torch.no_grad():
        new.model.norm.weight.mul_(5.0)  # a sharper policy: answers the old one finds less likely
    prompts = ["Tell me a joke.", "Name a number.", "What is the capital of France?"]

    def length(prompts, answers):
        return [float(len(a)) for a in answers]

    same = compare_on_held_out(old, old, tokenizer, prompts, length, samples=2, max_new_tokens=6, seed=0)
    assert (same.kl, same.nll_rise, same.nll_rise_se, same.reward_se) == (0.0, 0.0, 0.0, 0.0)
    other = compare_on_held_out(new, old, tokenizer, prompts, length, samples=2, max_new_tokens=6, seed=0)
    assert other.nll_rise != 0.0 and other.nll_rise_se > 0.0
