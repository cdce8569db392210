"""Tests of backend/dpo.py: a real DPO update of a tiny random Llama (LoRA and full fine-tune) that widens
the chosen-over-rejected log-prob margin, leaves the caller's model alone, and argument checks."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from backend.dpo import DPOConfig, preference_rows, train_dpo
from backend.evaluation import answer_logprobs
from backend.models import load_causal_lm
from backend.rl import StepStats

PROMPTS = ["What is the capital of France?", "Tell me a joke.", "How do I bake bread?", "How many days in a week?"]
CHOSEN = ["Paris is the capital of France.", "Why did the chicken cross the road?",
          "Mix flour, water, salt and yeast.", "There are 7 days in a week."]
REJECTED = ["I am sorry, I cannot help with that.", "I am sorry, I cannot help with that.",
            "Please ask something else.", "I cannot help with that."]
# one step per epoch over the 4 pairs; a large learning rate so 4 steps move the tiny model unambiguously
FAST = DPOConfig(epochs=4, batch_size=4, learning_rate=2e-2, lora_rank=4)


def margin(model, tokenizer) -> float:
    """Summed log-prob of the chosen answers minus that of the rejected ones."""
    chosen, _ = answer_logprobs(model, tokenizer, PROMPTS, CHOSEN)
    rejected, _ = answer_logprobs(model, tokenizer, PROMPTS, REJECTED)
    return (chosen - rejected).sum().item()


@pytest.fixture(scope="module")
def tiny(tiny_policy, device):
    model, tokenizer = load_causal_lm(str(tiny_policy))
    return model.to(device), tokenizer


@pytest.fixture(scope="module")
def trained(tiny):
    """One LoRA DPO run, shared by the tests that inspect it: (caller's weights before, new model, stats, seen)."""
    model, tokenizer = tiny
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen: list[StepStats] = []
    new_model, stats = train_dpo(model, tokenizer, PROMPTS, CHOSEN, REJECTED, FAST, on_step=seen.append)
    return before, new_model, stats, seen


def test_train_dpo_changes_lora_targets_and_widens_chosen_over_rejected_margin(tiny, trained):
    model, tokenizer = tiny
    before, new_model, stats, _ = trained
    after = new_model.state_dict()
    assert set(after) == set(before)  # a plain model: LoRA merged, no adapter keys
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert any("q_proj" in k for k in changed) and any("v_proj" in k for k in changed)
    assert not new_model.training and not any(p.requires_grad for p in new_model.parameters())
    assert margin(new_model, tokenizer) > margin(model, tokenizer) + 1.0


def test_train_dpo_reports_one_step_stats_per_optimisation_step(trained):
    _, _, stats, seen = trained
    assert [s.step for s in stats] == [1, 2, 3, 4] and seen == stats
    assert stats[0].reward_mean == 0  # step 1 runs the reference itself: no margin yet
    assert stats[-1].reward_mean > 0 and stats[-1].extra["rewards/accuracies"] == 1.0
    assert all(s.kl is None and s.entropy is None and math.isfinite(s.extra["loss"]) for s in stats)
    assert stats[-1].extra["loss"] < stats[0].extra["loss"] and stats[-1].eta_seconds == 0


def test_train_dpo_leaves_callers_model_untouched(tiny, trained):
    model, _ = tiny
    before, _, _, _ = trained
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "forward" not in vars(model)  # trl's fused LM head patched the copies, not the caller's model


def test_copy_of_trained_policy_runs_its_own_weights(trained):
    # trl's per-instance forward patch would make a deepcopy (the next round's policy) run the original's weights
    _, new_model, _, _ = trained
    clone = copy.deepcopy(new_model)
    ids = torch.tensor([[1, 5, 6, 7]], device=new_model.device)
    with torch.no_grad():
        clone.model.embed_tokens.weight.add_(1.0)
        assert not torch.allclose(clone(input_ids=ids).logits, new_model(input_ids=ids).logits)


def test_full_fine_tune_widens_margin_against_a_frozen_copy_of_the_serving_policy(tiny):
    model, tokenizer = tiny
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="learning_rate"):
        config = DPOConfig(epochs=2, batch_size=4, learning_rate=1e-2, lora_rank=0)
    new_model, stats = train_dpo(model, tokenizer, PROMPTS, CHOSEN, REJECTED, config)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert stats[0].reward_mean == 0  # the reference is the serving policy, not a checkpoint reloaded from disk
    assert margin(new_model, tokenizer) > margin(model, tokenizer)


def test_preference_rows_are_conversational_with_a_chat_template_else_rendered_text(tiny):
    _, tokenizer = tiny
    chat = preference_rows(tokenizer, ["Hi?"], ["Hello."], ["Go away."])
    assert chat == [{"prompt": [{"role": "user", "content": "Hi?"}],
                     "chosen": [{"role": "assistant", "content": "Hello."}],
                     "rejected": [{"role": "assistant", "content": "Go away."}]}]
    plain = preference_rows(SimpleNamespace(chat_template=None), ["Hi?"], ["Hello."], ["Go away."])
    assert plain == [{"prompt": "Hi?\n", "chosen": "Hello.", "rejected": "Go away."}]  # as render_prompt samples


def test_train_dpo_rejects_mismatched_pair_lengths_naming_the_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"prompts, chosen and rejected differ in length.*'rejected': 1"):
        train_dpo(model, tokenizer, PROMPTS[:2], CHOSEN[:2], REJECTED[:1], FAST)


def test_train_dpo_rejects_no_pairs(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="at least one preference pair"):
        train_dpo(model, tokenizer, [], [], [], FAST)


@pytest.mark.parametrize("field, value", [("beta", 0.0), ("epochs", 0), ("lora_rank", -1), ("learning_rate", -1e-4)])
def test_dpo_config_rejects_bad_value_naming_field_value_and_fix(field, value):
    with pytest.raises(ValueError, match=rf"DPOConfig\.{field}={value!r} is invalid: set it to"):
        DPOConfig(**{field: value})
