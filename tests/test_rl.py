"""Tests of backend/rl.py: a real update of a tiny random Llama by each algorithm (PPO, trl's GRPO
and RLOO), the reward-function adapter for trl's conversational and plain prompts, and argument checks."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from backend.models import load_causal_lm
from backend.ppo import PPOConfig
from backend.generation import render_prompt
from backend.rl import StepStats, fluency_reward_function, improve_policy, reference_nll_function, trl_reward_function

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "How do I bake bread?"]


@pytest.fixture(scope="module")
def tiny(tiny_policy, device):
    model, tokenizer = load_causal_lm(str(tiny_policy))
    return model.to(device), tokenizer


def count_a_reward(prompts: list[str], responses: list[str]) -> list[float]:
    if len(prompts) != len(responses) or not all(p in PROMPTS for p in prompts):
        raise AssertionError(f"reward_fn got prompts {prompts!r}: expected the raw prompts, one per response")
    return [r.count("a") + 0.1 * len(r) for r in responses]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_improve_policy_changes_lora_targets_and_leaves_input_model_untouched(tiny, algorithm):
    model, tokenizer = tiny
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen: list[StepStats] = []
    config = PPOConfig(steps=2, batch_size=2, mini_batch_size=1, max_new_tokens=8, lora_rank=4, learning_rate=1e-2)
    new_model, stats = improve_policy(algorithm, model, tokenizer, PROMPTS, count_a_reward, config,
                                      group_size=2, on_step=seen.append)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # read, never written
    after = new_model.state_dict()
    assert set(after) == set(original)  # a plain model: LoRA merged, no adapter or value-head keys
    changed = [k for k, v in original.items() if not torch.equal(v, after[k])]
    assert any("q_proj" in k for k in changed) and any("v_proj" in k for k in changed)
    assert not new_model.training and not any(p.requires_grad for p in new_model.parameters())

    assert [s.step for s in stats] == [1, 2] and seen == stats
    for s in stats:
        assert math.isfinite(s.reward_mean) and s.kl is not None and math.isfinite(s.kl)  # a sampled estimate: may be < 0
        assert s.entropy is not None and s.entropy > 0 and s.eta_seconds >= 0
    assert stats[-1].eta_seconds == 0


def test_trl_reward_function_scores_raw_prompt_and_text_of_conversational_completions():
    calls = []
    reward = trl_reward_function(lambda p, r: calls.append((p, r)) or [float(len(x)) for x in r])
    scores = reward(prompts=[[{"role": "user", "content": "Hi?"}]],
                    completions=[[{"role": "assistant", "content": " Hello! "}]], raw_prompt=["Hi?"],
                    completion_ids=[[1, 2]])
    assert scores == [6.0] and calls == [(["Hi?"], ["Hello!"])]


def test_trl_reward_function_scores_plain_text_completions():
    reward = trl_reward_function(lambda p, r: [float(len(x)) for x in r])
    assert reward(prompts=["<|im_start|>user\nHi?"], completions=["ab ", "abc"], raw_prompt=["Hi?", "Hi?"]) == [2.0, 3.0]


def extreme_continuation(model, tokenizer, prompt: str, tokens: int, likeliest: bool) -> list[int]:
    """`tokens` tokens after the rendered prompt, each the reference's likeliest (or least likely) next one."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(tokens):
            sequence = torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1)
            logits = model(input_ids=sequence.to(model.device)).logits
            out.append(int(logits[0, -1].argmax() if likeliest else logits[0, -1].argmin()))
    return out


def test_fluency_reward_pays_the_reference_s_likeliest_tokens_and_charges_its_unlikeliest(tiny):
    model, tokenizer = tiny
    fluency = fluency_reward_function(model, tokenizer, temperature=1.0)
    likely = extreme_continuation(model, tokenizer, PROMPTS[0], 6, likeliest=True)
    unlikely = extreme_continuation(model, tokenizer, PROMPTS[0], 6, likeliest=False)
    # -log p of the likeliest token is at most the entropy there, of the least likely at least
    good, bad = fluency(prompts=None, completions=None, completion_ids=[likely, unlikely],
                        raw_prompt=PROMPTS[:1] * 2)
    assert good > 0 > bad


def test_fluency_reward_of_a_completion_does_not_depend_on_its_batch_or_padding(tiny):
    model, tokenizer = tiny
    fluency = fluency_reward_function(model, tokenizer, temperature=1.0)
    short = extreme_continuation(model, tokenizer, PROMPTS[1], 2, likeliest=False)
    long = extreme_continuation(model, tokenizer, PROMPTS[2], 7, likeliest=True)
    together = fluency(prompts=None, completions=None, completion_ids=[short, long, []],
                       raw_prompt=PROMPTS[1:] + PROMPTS[:1])
    alone = [fluency(prompts=None, completions=None, completion_ids=[c], raw_prompt=[p])[0]
             for c, p in ((short, PROMPTS[1]), (long, PROMPTS[2]))]
    assert together[:2] == pytest.approx(alone, abs=1e-4) and together[2] == 0.0


def test_grpo_with_a_fluency_coef_logs_the_penalty_apart_from_the_reward_model(tiny):
    model, tokenizer = tiny
    config = PPOConfig(steps=1, batch_size=2, mini_batch_size=1, max_new_tokens=8, lora_rank=4, fluency_coef=0.5)
    _, stats = improve_policy("grpo", model, tokenizer, PROMPTS, count_a_reward, config, group_size=2)
    extra = stats[0].extra
    assert math.isfinite(extra["rewards/fluency/mean"]) and extra["rewards/fluency/mean"] != 0
    # the step's reward is the reward model's alone; trl's own sum weighs the penalty in
    assert stats[0].reward_mean == pytest.approx(extra["rewards/reward_model/mean"])


def test_improve_policy_rejects_unknown_algorithm(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"RL_ALGORITHM='a2c' is not supported: use one of ppo, grpo, rloo, dpo"):
        improve_policy("a2c", model, tokenizer, PROMPTS, count_a_reward, PPOConfig())


def test_dpo_without_pairs_names_the_missing_argument(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="RL_ALGORITHM=dpo needs preference pairs"):
        improve_policy("dpo", model, tokenizer, PROMPTS, count_a_reward, PPOConfig())


def test_improve_policy_rejects_group_of_one_for_grpo(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="group_size=1 is invalid for grpo"):
        improve_policy("grpo", model, tokenizer, PROMPTS, count_a_reward, PPOConfig(), group_size=1)


def test_rewards_are_centred_per_prompt_and_scaled_to_the_candidates_spread():
    from backend.rl import normalised_to_candidates

    def score(prompts, responses):
        return [float(len(r)) for r in responses]

    candidates = {"a": ["x", "xxx"], "b": ["x" * 10, "x" * 14]}  # scores 1, 3 and 10, 14: means 2 and 12
    spread = math.sqrt((1 + 1 + 4 + 4) / 4)
    reward = normalised_to_candidates(score, candidates)
    assert reward(["a", "b", "c"], ["xxxxx", "x" * 12, "xx"]) == pytest.approx([3 / spread, 0.0, 2 / spread])
    tenfold = normalised_to_candidates(lambda p, r: [10 * s for s in score(p, r)], candidates)
    assert tenfold(["a"], ["xxxxx"]) == pytest.approx(reward(["a"], ["xxxxx"]))  # any reward model's scale


def test_reference_nll_is_the_reference_s_mean_surprise_per_token_of_each_completion(tiny):
    model, tokenizer = tiny
    reference_nll = reference_nll_function(model, tokenizer, temperature=1.0)
    likely = extreme_continuation(model, tokenizer, PROMPTS[0], 6, likeliest=True)
    unlikely = extreme_continuation(model, tokenizer, PROMPTS[0], 3, likeliest=False)
    nll = reference_nll(prompts=None, completions=None, completion_ids=[likely, unlikely, []],
                        raw_prompt=PROMPTS[:1] * 3)
    by_hand = -token_logprobs_by_hand(model, tokenizer, PROMPTS[0], likely).mean().item()
    assert nll[0] == pytest.approx(by_hand, abs=1e-4)
    assert nll[0] < nll[1] and nll[2] == 0.0  # per token: the unlikeliest tokens are the more surprising


def token_logprobs_by_hand(model, tokenizer, prompt: str, completion: list[int]) -> torch.Tensor:
    """log pi(token) of each completion token, from one unpadded forward."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([ids + completion], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=sequence.to(model.device)).logits[0, len(ids) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, sequence[0, len(ids):, None].to(logits.device))[:, 0]


def test_trl_step_recorder_stops_once_the_rollout_nll_rises_past_stop_nll_rise_and_undoes_two_updates():
    from types import SimpleNamespace

    from transformers import TrainerControl

    from backend.rl import _StepRecorder

    layer = torch.nn.Linear(2, 2)
    recorder = _StepRecorder(steps=4, on_step=None, stop_kl=None, stop_nll_rise=0.5)
    control, args = TrainerControl(), SimpleNamespace(run_name="grpo")
    weights = []
    for step, nll in enumerate([2.4, 2.8, 3.0], start=1):  # rises 0, 0.4, then 0.6 > 0.5 over the first rollout
        recorder.on_step_begin(args, None, control, model=layer)
        weights.append(layer.weight.detach().clone())
        with torch.no_grad():
            layer.weight.add_(1.0)  # the step's update
        logs = {"reward": 1.0, "rewards/reference_nll/mean": nll}
        recorder.on_log(args, SimpleNamespace(global_step=step), control, logs=logs, model=layer)
        if control.should_training_stop:
            break
    assert step == 3 and control.should_training_stop
    assert torch.equal(layer.weight, weights[1])  # back to the start of step 2: its update and step 3's undone
    assert [s.step for s in recorder.stats] == [1]


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_run_with_stop_nll_rise_logs_each_rollouts_reference_nll_without_rewarding_it(tiny, algorithm):
    model, tokenizer = tiny
    config = PPOConfig(steps=2, batch_size=2, mini_batch_size=1, max_new_tokens=8, lora_rank=4, stop_nll_rise=50.0,
                       fluency_coef=0.0)
    _, stats = improve_policy(algorithm, model, tokenizer, PROMPTS, count_a_reward, config, group_size=2)
    assert len(stats) == 2  # a bound no tiny rollout reaches: the run goes on
    assert all(s.extra["rewards/reference_nll/mean"] > 0 for s in stats)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_run_stops_at_stop_kl_and_undoes_the_update_that_overshot(tiny, algorithm, caplog):
    model, tokenizer = tiny
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # step 1 samples the starting policy (KL 0) and updates hard; step 2's rollout then passes the tiny
    # stop_kl, so both updates are undone: the run hands back the starting weights and no step's stats
    config = PPOConfig(steps=4, batch_size=2, mini_batch_size=1, max_new_tokens=8, lora_rank=4, learning_rate=5e-2,
                       stop_kl=1e-6)
    with caplog.at_level(logging.WARNING, logger="backend.rl"):
        new_model, stats = improve_policy(algorithm, model, tokenizer, PROMPTS, count_a_reward, config, group_size=2)
    assert stats == []
    after = new_model.state_dict()
    assert all(torch.equal(v, after[k].to(v.device)) for k, v in original.items())
    assert f"{algorithm} stopped at step 2/4: rollout KL" in caplog.text
