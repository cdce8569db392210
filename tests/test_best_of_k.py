"""Tests of backend/best_of_k.py: best-of-K fine-tuning on a tiny random Llama."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from backend.best_of_k import best_of_groups, sequence_logprobs, supervised_passes, train_best_of_k
from backend.models import load_causal_lm
from backend.ppo import PPOConfig, peft_deprecation_silenced, sample_responses
from backend.rl import improve_policy

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "How do I bake bread?"]


@pytest.fixture(scope="module")
def tiny(tiny_policy, device):
    model, tokenizer = load_causal_lm(str(tiny_policy))
    return model.to(device), tokenizer


def test_the_best_of_each_group_is_its_highest_score_as_a_row_of_the_flat_batch():
    scores = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 2.0]])  # 2 prompts x 3 samples; a tie goes to the first
    assert best_of_groups(scores, torch.zeros_like(scores), fluency_coef=0.03).tolist() == [1, 3]


def test_the_best_of_a_group_pays_for_the_reference_s_surprise_at_it():
    scores = torch.tensor([[1.0, 0.9]])  # the first scores higher, but the reference is 30 nats more surprised by it
    surprise = torch.tensor([[30.0, 0.0]])
    assert best_of_groups(scores, surprise, fluency_coef=0.03).tolist() == [1]
    assert best_of_groups(scores, surprise, fluency_coef=0.0).tolist() == [0]


def longer_is_better(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def test_best_of_k_fine_tunes_a_copy_on_the_best_of_each_group_and_leaves_the_input_model_untouched(tiny):
    model, tokenizer = tiny
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scored: list[str] = []

    def longer_is_better_recorded(prompts, responses):
        scored.extend(responses)
        return longer_is_better(prompts, responses)

    config = PPOConfig(steps=2, batch_size=3, mini_batch_size=3, max_new_tokens=12, lora_rank=4, learning_rate=1e-2)
    seen = []
    new_model, stats = improve_policy("best_of_k", model, tokenizer, PROMPTS, longer_is_better_recorded, config,
                                      group_size=4, on_step=seen.append)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # read, never written
    after = new_model.state_dict()
    assert set(after) == set(original)  # a plain model: LoRA merged
    assert any("q_proj" in k and not torch.equal(v, after[k]) for k, v in original.items())
    assert not new_model.training and not any(p.requires_grad for p in new_model.parameters())
    assert [s.step for s in stats] == [1, 2] and seen == stats and len(scored) == 24  # 2 x 3 prompts x 4 samples
    first = [len(r) for r in scored[:12]]
    assert stats[0].extra["best_reward"] == pytest.approx(sum(max(first[i:i + 4]) for i in range(0, 12, 4)) / 3)
    assert stats[0].reward_mean == pytest.approx(sum(first) / 12)


def test_supervised_passes_make_the_kept_answers_likelier(tiny):
    model, tokenizer = tiny
    config = PPOConfig(batch_size=3, mini_batch_size=3, max_new_tokens=12, lora_rank=4, learning_rate=1e-2)
    sequences, attention_mask, mask, _ = sample_responses(model, tokenizer, PROMPTS, config)
    with peft_deprecation_silenced():
        policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8,
                                                                 target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        before = sequence_logprobs(policy, sequences, attention_mask, mask, 1.0).sum(-1)
    supervised_passes(policy, torch.optim.Adam(trainable, lr=1e-2), trainable, sequences, attention_mask, mask,
                      config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = sequence_logprobs(policy, sequences, attention_mask, mask, 1.0).sum(-1)
    assert (after > before).all()


def test_best_of_k_stops_at_stop_kl_and_undoes_the_step_that_overshot(tiny, caplog):
    model, tokenizer = tiny
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # step 1 samples the starting policy (KL 0) and steps hard; step 2's samples pass the tiny stop_kl
    config = PPOConfig(steps=4, batch_size=2, max_new_tokens=8, lora_rank=4, learning_rate=5e-2, stop_kl=1e-6)
    with caplog.at_level(logging.WARNING, logger="backend.best_of_k"):
        new_model, stats = train_best_of_k(model, tokenizer, PROMPTS, longer_is_better, config, samples=2)
    assert stats == []
    assert all(torch.equal(v, new_model.state_dict()[k].to(v.device)) for k, v in original.items())
    assert "best_of_k stopped at step 2/4: rollout KL" in caplog.text


@pytest.mark.parametrize("samples, lora_rank, message", [(1, 4, "samples=1 is invalid for best_of_k"),
                                                         (2, 0, "set LORA_RANK >= 1")])
def test_best_of_k_names_the_setting_to_fix(tiny, samples, lora_rank, message):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        train_best_of_k(model, tokenizer, PROMPTS, longer_is_better, PPOConfig(lora_rank=lora_rank), samples)
