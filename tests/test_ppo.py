"""Tests of backend/ppo.py: the pure PPO functions against hand-computed values, and real
updates of a tiny random Llama (a second or two each on CPU)."""

from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # fallback when no conftest puts tests/ on the path

from tiny_models import build_tiny_policy  # noqa: E402

from backend.evaluation import answer_logprobs  # noqa: E402
from backend.models import load_causal_lm  # noqa: E402
from backend.ppo import (  # noqa: E402
    AdaptiveKLController,
    PPOConfig,
    compute_gae,
    drift_reason,
    excess_surprise,
    warmup_learning_rate,
    nll_rise,
    prompt_nll,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    prompt_batches,
    response_mask,
    steps_left,
    train_ppo,
    value_loss,
)

T = torch.tensor


# ----------------------------------------------------------------------------- pure functions


def test_masked_mean_ignores_masked_positions():
    assert masked_mean(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])).item() == pytest.approx(2.0)


def test_masked_mean_of_empty_mask_raises():
    with pytest.raises(ValueError, match="mask is all zeros"):
        masked_mean(T([[1.0, 2.0]]), T([[0, 0]]))


def test_masked_whiten_gives_zero_mean_unit_variance_and_zeros_masked_positions():
    # mean 2, biased variance 2/3 -> (x - 2) / sqrt(2/3) = -1.2247, 0, 1.2247
    out = masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]]))
    assert out.tolist()[0] == pytest.approx([-1.224744, 0.0, 1.224744, 0.0], abs=1e-5)


def test_kl_penalized_rewards_places_score_at_last_real_token():
    scores = T([2.0, -1.0])
    logprobs = T([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref_logprobs = T([[-1.5, -1.0, -1.0], [-2.0, -3.0, -2.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # kl = logp - ref_logp on real tokens: [[0.5, 0, 0], [0, 1, (masked)]]
    torch.testing.assert_close(kl, T([[0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # -0.1 * kl everywhere, + score at index 2 (row 0) and index 1 (row 1, its last real token)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, 2.0])
    assert rewards[1].tolist() == pytest.approx([0.0, -0.1 - 1.0, 0.0])


def test_excess_surprise_is_the_references_surprise_beyond_its_entropy():
    # the reference puts [0.5, 0.25, 0.25] on three tokens: entropy 1.0397; surprise of the first 0.6931,
    # of the others 1.3863
    entropy = -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    ref_logprobs = T([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    out = excess_surprise(ref_logprobs, T([[entropy] * 3]), T([[1, 1, 0]]))
    assert out.tolist()[0] == pytest.approx([math.log(2) - entropy, math.log(4) - entropy, 0.0], abs=1e-5)
    # on the reference's own samples it is 0 on average: 0.5 * (0.6931 - H) + 0.5 * (1.3863 - H) = 0
    assert 0.5 * out[0, 0].item() + 0.5 * out[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_compute_gae_matches_hand_computation_on_1x3():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.3]]), T([[1, 1, 1]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=2: delta = 1 - 0.3 = 0.7;                A2 = 0.7
    # t=1: delta = 0.9 * 0.3 - 0.4 = -0.13;      A1 = -0.13 + 0.45 * 0.7 = 0.185
    # t=0: delta = 0.9 * 0.4 - 0.5 = -0.14;      A0 = -0.14 + 0.45 * 0.185 = -0.05675
    assert advantages.tolist()[0] == pytest.approx([-0.05675, 0.185, 0.7])
    assert returns.tolist()[0] == pytest.approx([0.44325, 0.585, 1.0])


def test_compute_gae_treats_masked_positions_as_terminal():
    rewards, values, mask = T([[0.0, 1.0, 5.0]]), T([[0.5, 0.4, 9.0]]), T([[1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # t=2 is masked: it contributes nothing. t=1 is last: A1 = 1 - 0.4 = 0.6; A0 = 0.4 - 0.5 + 0.6 = 0.5
    assert advantages.tolist()[0] == pytest.approx([0.5, 0.6, 0.0])
    assert returns.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])


def test_policy_loss_clips_ratio_above_one_plus_cliprange():
    # both tokens have ratio 1.5; token 0 has A = +1 (clip binds), token 1 has A = -1 (it does not)
    logprobs = T([[math.log(1.5), math.log(1.5)]])
    loss, clipfrac = policy_loss(logprobs, T([[0.0, 0.0]]), T([[1.0, -1.0]]), T([[1, 1]]), cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(1.5, 1.2) = 1.5; mean 0.15
    assert loss.item() == pytest.approx(0.15)
    assert clipfrac.item() == pytest.approx(0.5)


def test_value_loss_takes_clipped_error_when_it_is_larger():
    # v moved 0 -> 1 towards a return of 1: the unclipped error is 0, the clipped value 0.2 errs by 0.8
    loss = value_loss(T([[1.0]]), T([[0.0]]), T([[1.0]]), T([[1]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2)


def test_value_loss_takes_unclipped_error_when_it_is_larger():
    # v moved 0 -> 1 away from a return of 0: unclipped error 1, clipped error 0.2
    loss = value_loss(T([[1.0]]), T([[0.0]]), T([[0.0]]), T([[1]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5)


def test_kl_controller_grows_when_kl_above_target():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=1.0, horizon=10)
    controller.update(current_kl=2.0, n_steps=5)  # error clip(2 - 1) = 0.2 -> 0.1 * (1 + 0.2 * 0.5)
    assert controller.value == pytest.approx(0.11)


def test_kl_controller_shrinks_when_kl_below_target():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=1.0, horizon=10)
    controller.update(current_kl=0.5, n_steps=5)  # error clip(-0.5) = -0.2 -> 0.1 * (1 - 0.2 * 0.5)
    assert controller.value == pytest.approx(0.09)


def test_prompt_nll_averages_each_prompts_responses():
    ref_logprobs = T([[-1.0, -2.0, -9.0], [-3.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # "a" answered twice: NLL sums 3 and 5 over 2 and 3 tokens; "b" once: 2 over 1
    assert prompt_nll(["a", "a", "b"], ref_logprobs, mask) == {"a": (4.0, 2.5), "b": (2.0, 1.0)}


def test_nll_rise_pairs_the_rollout_with_the_reference_answers_to_the_same_prompts():
    baseline = {"a": (4.0, 2.0), "b": (9.0, 3.0), "c": (100.0, 1.0)}  # "c" is not in the batch: ignored
    ref_logprobs = T([[-3.0, -3.0], [-3.0, -3.0]])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    # rollout: 9 nats over 3 tokens = 3.0; reference on a and b: (4 + 9) / (2 + 3) = 2.6
    assert nll_rise(baseline, ["a", "b"], ref_logprobs, mask) == pytest.approx(0.4)


def test_warmup_learning_rate_ramps_linearly_then_holds():
    assert [warmup_learning_rate(6e-4, step, warmup_steps=2) for step in (1, 2, 3, 9)] == pytest.approx(
        [2e-4, 4e-4, 6e-4, 6e-4])
    assert warmup_learning_rate(6e-4, 1, warmup_steps=0) == 6e-4


def test_drift_reason_is_none_within_both_bounds():
    assert drift_reason(kl=3.9, rise=0.2, stop_kl=4.0, stop_nll_rise=0.3) is None
    assert drift_reason(kl=99.0, rise=9.0, stop_kl=None, stop_nll_rise=None) is None
    assert drift_reason(kl=1.0, rise=None, stop_kl=4.0, stop_nll_rise=0.3) is None


def test_drift_reason_names_kl_past_stop_kl():
    assert drift_reason(kl=4.7, rise=0.0, stop_kl=4.0, stop_nll_rise=0.3) == (
        "rollout KL 4.70 > stop_kl 4.00 nats per sequence")


def test_drift_reason_names_nll_rise_past_stop_nll_rise_even_at_small_kl():
    assert drift_reason(kl=1.2, rise=0.37, stop_kl=4.0, stop_nll_rise=0.3) == (
        "the reference's NLL of the rollout rose +0.37 > stop_nll_rise 0.30 nats per token over its own answers")


def test_response_mask_keeps_tokens_up_to_and_including_first_eos():
    eos = 0
    ids = T([[5, eos, eos, eos], [5, 6, 7, 8], [eos, 5, eos, 6]])
    assert response_mask(ids, [eos]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_prompt_batches_cycle_through_every_prompt():
    batches = prompt_batches(["a", "b", "c"], batch_size=2, seed=0)
    seen = next(batches) + next(batches) + next(batches)  # 6 draws over 3 prompts: each twice
    assert sorted(seen) == ["a", "a", "b", "b", "c", "c"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mini_batch_size": 3}, r"PPOConfig.mini_batch_size=3 is invalid: set it to a divisor of batch_size=4"),
        ({"temperature": 0.0}, r"PPOConfig.temperature=0.0 is invalid: set it to a float > 0"),
        ({"lora_rank": -1}, r"PPOConfig.lora_rank=-1 is invalid"),
        ({"lam": 1.5}, r"PPOConfig.lam=1.5 is invalid: set it to a float in \[0, 1\]"),
        ({"fluency_coef": -0.1}, r"PPOConfig.fluency_coef=-0.1 is invalid: set it to a float >= 0 \(0 = off\)"),
    ],
)
def test_config_validation_names_field_value_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


# ----------------------------------------------------------------------------- real updates


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, device):
    model, tokenizer = load_causal_lm(str(build_tiny_policy(tmp_path_factory.mktemp("tiny-policy"))))
    return model.to(device), tokenizer


PROMPTS = ["What is the capital of France?", "Tell me a joke.", "How do I bake bread?"]


def count_a_reward(prompts: list[str], responses: list[str]) -> list[float]:
    # the length term keeps scores from all being 0, which would leave nothing to learn from
    return [r.count("a") + 0.1 * len(r) for r in responses]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model) -> list[str]:
    after = model.state_dict()
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def test_train_ppo_with_lora_changes_weights_and_leaves_input_model_untouched(tiny, caplog):
    model, tokenizer = tiny
    original = _snapshot(model)
    seen = []
    config = PPOConfig(steps=2, batch_size=2, mini_batch_size=1, max_new_tokens=8, lora_rank=4, learning_rate=1e-2)
    with caplog.at_level(logging.INFO, logger="backend.ppo"):
        new_model, stats = train_ppo(model, tokenizer, PROMPTS, count_a_reward, config, on_step=seen.append)

    assert _changed(original, model) == []  # the caller's model is read, never written
    changed = _changed(original, new_model)
    assert any("q_proj" in k for k in changed) and any("o_proj" in k for k in changed)
    assert set(new_model.state_dict()) == set(original)  # plain model: no LoRA or value-head keys
    assert not new_model.training

    assert [s.step for s in stats] == [1, 2] and seen == stats
    for s in stats:
        assert s.nll_rise is None  # measured only with stop_nll_rise
        assert all(math.isfinite(v) for k, v in vars(s).items() if k != "nll_rise")
    # LoRA's B matrices start at 0, so the first rollout's policy is exactly the reference
    assert stats[0].kl == pytest.approx(0.0, abs=1e-5)
    assert [r.getMessage().startswith(f"ppo step {i}/2") for i, r in enumerate(caplog.records, 1)] == [True, True]

    enc = tokenizer(["Hello"], return_tensors="pt").to(new_model.device)
    out = new_model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_train_ppo_full_fine_tune_changes_every_layer_but_not_the_input(tiny):
    model, tokenizer = tiny
    original = _snapshot(model)
    config = PPOConfig(steps=1, batch_size=2, max_new_tokens=8, lora_rank=0, learning_rate=1e-3)
    new_model, stats = train_ppo(model, tokenizer, PROMPTS, count_a_reward, config)
    assert _changed(original, model) == []
    changed = _changed(original, new_model)
    assert any("mlp" in k for k in changed) and any("embed_tokens" in k for k in changed)
    assert len(stats) == 1 and math.isfinite(stats[0].policy_loss)


def test_train_ppo_rejects_reward_fn_with_wrong_number_of_scores(tiny):
    model, tokenizer = tiny
    config = PPOConfig(steps=1, batch_size=2, max_new_tokens=4, lora_rank=4)
    with pytest.raises(ValueError, match="reward_fn returned 1 scores for 2 responses"):
        train_ppo(model, tokenizer, PROMPTS, lambda p, r: [0.0], config)


def test_train_ppo_stop_kl_undoes_the_update_that_overshot(tiny):
    model, tokenizer = tiny
    original = _snapshot(model)
    # step 1 samples from the reference (KL 0) and updates hard; step 2's rollout then exceeds the
    # tiny stop_kl, so the run stops and puts back the weights before step 1's update: the input model
    config = PPOConfig(steps=4, batch_size=2, max_new_tokens=8, lora_rank=4, learning_rate=5e-2, stop_kl=1e-6)
    new_model, stats = train_ppo(model, tokenizer, PROMPTS, count_a_reward, config)
    assert stats == []  # the only update was undone, so no step's update is in the returned policy
    assert _changed(original, new_model) == []


def test_train_ppo_stop_nll_rise_ends_the_run_at_the_first_rollout_past_the_bound(tiny, caplog):
    model, tokenizer = tiny

    def reference_nll(prompts, responses):  # rewards text the reference finds unlikely: the drift to stop
        sums, counts = answer_logprobs(model, tokenizer, prompts, responses)
        return [float(-s / max(int(c), 1)) for s, c in zip(sums, counts)]

    config = PPOConfig(steps=4, batch_size=2, max_new_tokens=8, lora_rank=0, learning_rate=1e-2, init_kl_coef=0.0)
    # a bound never reached: the run measures the rise at every step (sampling the reference for
    # prompts it meets for the first time) and so draws the same random numbers as a stopped run
    _, free = train_ppo(model, tokenizer, PROMPTS, reference_nll, replace(config, stop_nll_rise=1e9))
    rises = [s.nll_rise for s in free]
    assert rises[0] == pytest.approx(0.0, abs=1e-4)  # step 1 samples the reference itself
    # a bound between the rises before the first clear rise and that rise, so the step the run stops
    # at follows from the free run
    first_past = next(i for i, rise in enumerate(rises) if i > 0 and rise > 1e-3)
    bound = (max(rises[:first_past]) + rises[first_past]) / 2
    with caplog.at_level(logging.WARNING, logger="backend.ppo"):
        _, stopped = train_ppo(model, tokenizer, PROMPTS, reference_nll, replace(config, stop_nll_rise=bound))
    # the rollout past the bound undoes the update before it: the stats keep the updates before that
    assert [s.step for s in stopped] == [s.step for s in free[:first_past - 1]]
    assert [s.nll_rise for s in stopped] == pytest.approx(rises[:first_past - 1])
    assert "the reference's NLL of the rollout rose" in caplog.text


def test_train_ppo_fluency_coef_holds_back_drift_into_text_the_reference_finds_unlikely(tiny):
    # a random tiny model is near uniform, so no token surprises it; sharpened, it has likely and unlikely tokens
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)

    def reference_nll(prompts, responses):  # rewards exactly the drift the fluency penalty resists
        sums, counts = answer_logprobs(model, tokenizer, prompts, responses)
        return [float(-s / max(int(c), 1)) for s, c in zip(sums, counts)]

    config = PPOConfig(steps=6, batch_size=4, mini_batch_size=2, max_new_tokens=8, lora_rank=0,
                       learning_rate=1e-2, init_kl_coef=0.0)
    surprise = {}
    for coef in (0.0, 2.0):
        _, stats = train_ppo(model, tokenizer, PROMPTS, reference_nll, replace(config, fluency_coef=coef))
        surprise[coef] = sum(s.excess_surprise for s in stats[2:]) / len(stats[2:])
    assert surprise[0.0] > 0.1  # unchecked, the policy learns to write what the reference would not
    assert surprise[2.0] < surprise[0.0] - 0.5  # penalised, it keeps to tokens the reference expects


def test_train_ppo_step_stats_report_rollout_time_and_tokens(tiny):
    model, tokenizer = tiny
    config = PPOConfig(steps=1, batch_size=2, max_new_tokens=8, lora_rank=4)
    _, (s,) = train_ppo(model, tokenizer, PROMPTS, count_a_reward, config)
    assert 0 < s.rollout_seconds < s.seconds
    assert 2 <= s.response_tokens <= 2 * 8  # each response has at least one token and at most max_new_tokens
    assert s.entropy > 0 and s.value_loss >= 0 and s.eta_seconds == 0


def test_config_rejects_non_positive_stop_kl():
    with pytest.raises(ValueError, match=r"PPOConfig.stop_kl=0.0 is invalid: set it to None or a float > 0"):
        PPOConfig(stop_kl=0.0)


def test_config_rejects_non_positive_stop_nll_rise():
    with pytest.raises(ValueError, match=r"PPOConfig.stop_nll_rise=-0.1 is invalid: set it to None or a float > 0"):
        PPOConfig(stop_nll_rise=-0.1)


def test_eta_counts_the_steps_until_the_kl_budget_runs_out_not_the_planned_steps():
    # 4 nats after 4 steps: 1 a step, so steps 5-8 reach the budget of 8 and step 9's rollout passes it
    assert steps_left(4, planned=16, kl=4.0, stop_kl=8.0) == 5
    assert steps_left(4, planned=6, kl=4.0, stop_kl=8.0) == 2  # the planned steps end first
    assert steps_left(3, planned=16, kl=9.0, stop_kl=8.0) == 0  # this rollout passed it: the run stops now
    # without a budget, or before any KL is measured, the planned steps are what is left
    assert steps_left(4, planned=16, kl=4.0, stop_kl=None) == 12
    assert steps_left(1, planned=16, kl=0.0, stop_kl=8.0) == 15
    assert steps_left(2, planned=16, kl=None, stop_kl=8.0) == 14
