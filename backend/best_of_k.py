"""Best-of-K fine-tuning: a policy, prompts and a reward function in; the policy tuned on its own best answers out.

In:  the previous policy (a plain causal LM, also the KL reference), its tokenizer, raw prompts, a
     `RewardFn` scoring decoded text (the reward model), the `PPOConfig` every algorithm's schedule comes
     from, and K, the samples per prompt (`RL_GROUP_SIZE`).
Out: the new policy as a plain causal LM (LoRA merged, eval mode) and one `backend.rl.StepStats` per step.

Rejection-sampling fine-tuning, run online: each step samples K answers to each of `batch_size` prompts
from the current policy, keeps each prompt's best answer, and fine-tunes on the kept answers (their
sampled tokens, the eos included when one was sampled) as PPO optimises a rollout. "Best" is PPO's
objective: the reward model's score less `fluency_coef` times the reference's excess surprise summed over
the answer (backend/ppo.py): by the reward alone, "shorter" kept answers whose NLL under the base
policy rose +0.86 nats/token. As
the policy improves, its next K samples start from better answers, so the steps compound (RAFT, Dong et
al. 2023; ReST, Gulcehre et al. 2023; Llama 2's rejection sampling, Touvron et al. 2023). It learns only
from answers the policy itself wrote, never pushes an answer down, and needs no value model: a rare
feature the taste wants (a number, a "you") is found among K samples of one prompt and reinforced
directly, where PPO's one sample a prompt must wait for its value head to credit it.

From the shared config: steps, batch_size (prompts per step), ppo_epochs and mini_batch_size (the passes over
the kept answers), learning_rate, warmup_steps, max_grad_norm, lora_rank, seed, max_new_tokens,
temperature, fluency_coef, and stop_kl, which ends a run and undoes the step that overshot as PPO's does. The
rollout KL is measured on the first of each prompt's K samples, a plain sample of the policy (the kept
ones are not), as the exact KL of its next-token distributions. A supervised step has no place for a KL
coefficient: the KL stop and the guard rails' held-out checks bound the drift.

Shapes: B prompts, K samples each, P prompt tokens (left-padded), R response tokens, V vocabulary size.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from backend.ppo import (
    PPOConfig,
    RewardFn,
    causal_lm_logits,
    drift_reason,
    entropy_from_logits,
    excess_surprise,
    load_trainable_state,
    lora_target_modules,
    masked_mean,
    peft_deprecation_silenced,
    prompt_batches,
    response_slice,
    sample_responses,
    score_responses,
    steps_left,
    token_logprobs,
    trainable_state,
    warmup_learning_rate,
)
from backend.rl import StepStats

log = logging.getLogger(__name__)


def best_of_groups(scores: torch.Tensor, surprise: torch.Tensor, fluency_coef: float) -> torch.Tensor:
    """(B,) row index in the flat (B * K,) batch of each group's best answer by PPO's objective: the reward-model
    score (B, K) less `fluency_coef` times the answer's summed excess surprise (B, K); ties: the first."""
    objective = scores - fluency_coef * surprise  # (B, K)
    return objective.argmax(-1) + torch.arange(scores.shape[0], device=scores.device) * scores.shape[1]


def response_logits(lm, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """(B, R, V) the logits of `lm` that predict the last `response_len` tokens of left-padded sequences (B, P + R)."""
    return response_slice(causal_lm_logits(lm, sequences, attention_mask), response_len)


def sequence_logprobs(lm: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, R) log p(token) of the response tokens of left-padded sequences (B, P + R); 0 where mask is 0."""
    logits = response_logits(lm, sequences, attention_mask, mask.shape[1])  # (B, R, V)
    return token_logprobs(logits, sequences[:, -mask.shape[1]:], temperature) * mask


@torch.no_grad()
def reference_surprise(policy, sequences: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                       temperature: float, batch_size: int = 8) -> torch.Tensor:
    """(N,) PPO's fluency measure of each answer: the reference's `excess_surprise` summed over its tokens."""
    sums = []
    with policy.disable_adapter():
        for start in range(0, len(sequences), batch_size):
            rows = slice(start, start + batch_size)
            logits = response_logits(policy, sequences[rows], attention_mask[rows], mask.shape[1])  # (b, R, V)
            tokens = sequences[rows, -mask.shape[1]:]  # (b, R)
            sums.append(excess_surprise(token_logprobs(logits, tokens, temperature),
                                        entropy_from_logits(logits, temperature), mask[rows]).sum(-1))
    return torch.cat(sums)


@torch.no_grad()
def rollout_kl(policy, sequences: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
               temperature: float) -> float:
    """KL(policy || reference) in nats per sequence on samples of the policy: at each of their positions the exact
    KL between the two next-token distributions, summed over the sequence and averaged over sequences.

    The same quantity as PPO's rollout KL (sum_t log-ratio of the sampled tokens) in expectation, but never
    negative and with far less variance on the few plain samples a step has."""

    def next_token_logprobs(lm) -> torch.Tensor:  # (B, R, V)
        return F.log_softmax(response_logits(lm, sequences, attention_mask, mask.shape[1]).float() / temperature, -1)

    logp = next_token_logprobs(policy)
    with policy.disable_adapter():
        ref_logp = next_token_logprobs(policy)
    per_token = (logp.exp() * (logp - ref_logp)).sum(-1) * mask  # (B, R)
    return per_token.sum(-1).mean().item()


def supervised_passes(policy, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                      sequences: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, config: PPOConfig,
                      generator: torch.Generator) -> float:
    """`ppo_epochs` passes of next-token loss over the kept answers (B, P + R), in shuffled mini-batches of
    `mini_batch_size`, as PPO optimises its rollouts; the mean loss (nats per answer token) out."""
    losses = []
    for _ in range(config.ppo_epochs):
        for idx in torch.randperm(len(sequences), generator=generator).split(config.mini_batch_size):
            logprobs = sequence_logprobs(policy, sequences[idx], attention_mask[idx], mask[idx], config.temperature)
            loss = -masked_mean(logprobs, mask[idx].to(logprobs.dtype))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


def train_best_of_k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    reward_fn: RewardFn,
    config: PPOConfig,
    samples: int,
    on_step: Callable[[StepStats], None] | None = None,
) -> tuple[PreTrainedModel, list[StepStats]]:
    """Run `config.steps` best-of-`samples` steps from `model`; return the new plain policy and per-step stats.

    `model` is the starting policy and the KL reference; it is read, never written (training happens on a
    LoRA copy). With `config.stop_kl` the run may end early, undoing the step that overshot.
    """
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt to train on")
    if samples < 2:
        raise ValueError(f"samples={samples} is invalid for best_of_k: set RL_GROUP_SIZE to an integer >= 2, as the "
                         "best of one answer is just a sample")
    if config.lora_rank < 1:
        raise ValueError("best_of_k trains LoRA adapters and measures KL with them disabled: set LORA_RANK >= 1")
    torch.manual_seed(config.seed)
    policy = copy.deepcopy(model)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=lora_target_modules(policy), bias="none", task_type="CAUSAL_LM")
    with peft_deprecation_silenced():
        policy = get_peft_model(policy, lora).eval()  # eval: no dropout; LoRA weights still train
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)
    batches = prompt_batches(prompts, config.batch_size, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    stats: list[StepStats] = []
    before_update: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        step_start = time.perf_counter()
        batch = next(batches)
        # rollout: K answers to each prompt from the current policy, scored by the reward model
        repeated = [p for p in batch for _ in range(samples)]
        sequences, attention_mask, mask, responses = sample_responses(policy, tokenizer, repeated, config)
        scores = score_responses(reward_fn, repeated, responses).view(len(batch), samples)  # (B, K)
        surprise = reference_surprise(policy, sequences, attention_mask, mask, config.temperature)  # (B * K,)
        # drift: the first answer of each prompt is a plain sample of the policy, so it estimates the KL
        plain = torch.arange(len(batch)) * samples  # (B,)
        kl = rollout_kl(policy, sequences[plain], attention_mask[plain], mask[plain], config.temperature)
        drift = drift_reason(kl, None, config.stop_kl, None)
        if drift is not None and before_update is not None:
            load_trainable_state(policy, before_update)
            stats.pop()  # that step is undone: stats describe the steps the returned policy holds
            log.warning("best_of_k stopped at step %d/%d: %s; kept the policy that sampled step %d",
                        step, config.steps, drift, step - 1)
            break
        # fine-tune: supervised passes over each prompt's best answer, on PPO's schedule
        best = best_of_groups(scores, surprise.view(len(batch), samples), config.fluency_coef)  # (B,)
        before_update = trainable_state(policy) if config.stop_kl is not None else None
        for group in optimizer.param_groups:
            group["lr"] = warmup_learning_rate(config.learning_rate, step, config.warmup_steps)
        loss = supervised_passes(policy, optimizer, trainable, sequences[best], attention_mask[best], mask[best],
                                 config, generator)
        now = time.perf_counter()
        stats.append(StepStats(
            step=step, reward_mean=scores.mean().item(), kl=kl, entropy=None, seconds=now - step_start,
            eta_seconds=(now - started) / step * steps_left(step, config.steps, kl, config.stop_kl),
            extra={"best_reward": scores.view(-1)[best].mean().item(), "sft_loss": loss,
                   "best_surprise": surprise[best].mean().item(),
                   "response_tokens": int(mask[best].sum())},
        ))
        log.info("best_of_k step %d/%d: reward %.4f (best %.4f) kl %.4f sft_loss %.4f | %.1fs eta %.0fs", step,
                 config.steps, stats[-1].reward_mean, stats[-1].extra["best_reward"], kl, loss,
                 stats[-1].seconds, stats[-1].eta_seconds)
        if on_step is not None:
            on_step(stats[-1])
    merged = policy.merge_and_unload()
    return merged.eval().requires_grad_(False), stats
