"""PPO: a policy, prompts and a reward function in; the updated policy and per-step stats out.

In:  the previous policy (a plain causal LM, also the KL reference), its tokenizer, raw
     prompts, a `RewardFn` scoring decoded text, and a `PPOConfig`.
Out: the new policy as a plain causal LM (LoRA merged, value head dropped, eval mode) and
     one `PPOStepStats` per step whose update it holds.

The recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") as
used by InstructGPT (Ouyang et al. 2022). We write it out because trl removed `PPOTrainer`
after 1.12 and its version fed policy token ids to the reward model (shared/models/README.md).
Each step:
1. sample responses to `batch_size` prompts from the current policy;
2. score the decoded text with `reward_fn` (the reward model has its own tokenizer);
3. reward = score at the last response token - kl_coef * (log pi - log pi_ref) at every token
   - fluency_coef * (-log pi_ref - H(pi_ref)), the reference's surprise beyond its entropy there
   (our addition: the KL term lets NLL drift at little KL, see `excess_surprise`);
4. advantages by GAE over a value head on the policy's last hidden state;
5. `ppo_epochs` passes of clipped policy + value losses over shuffled mini-batches;
6. move kl_coef towards `target_kl` (Ziegler et al. 2019, section 2.2).
A run stops early, and hands back the policy before the update that overshot, once a
rollout drifts too far from the reference: its KL exceeds `stop_kl`, or the reference's
per-token NLL of the sampled text rises more than `stop_nll_rise` over the reference's own
answers to the same prompts (see `train_ppo`).

Shapes: B sequences, P prompt tokens (left-padded), R response tokens, V vocabulary size.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from backend.generation import render_prompt

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], list[float]]
"""(raw prompts, decoded responses) -> one score per response. Text, never token ids: the
reward model has its own tokenizer."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PPOConfig:
    # --- schedule ---
    steps: int = 4  # rollout + optimisation iterations
    batch_size: int = 4  # prompts per rollout (one response each)
    mini_batch_size: int = 2  # sequences per gradient step; divides batch_size
    ppo_epochs: int = 2  # optimisation passes over each rollout
    learning_rate: float = 2e-4  # Adam learning rate
    # steps whose learning rate ramps up linearly (step k of n uses k / (n + 1) of it): Adam's first
    # updates move every weight by about the learning rate whatever the gradient (docs/ppo.md); 0 = none
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # clip of the global gradient norm
    lora_rank: int = 16  # LoRA rank on q/k/v/o projections (alpha = 2 * rank); 0 = full fine-tune
    seed: int = 0  # seeds prompt order, sampling and mini-batch order
    # --- sampling ---
    max_new_tokens: int = 48  # response length cap
    temperature: float = 1.0  # sampling temperature, also applied to the log-probs PPO optimises
    # --- advantages ---
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda: 0 = one-step TD, 1 = Monte Carlo
    # --- losses ---
    cliprange: float = 0.2  # policy ratio clip epsilon
    cliprange_value: float = 0.2  # how far a value may move from its rollout value before clipping
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    # --- KL penalty to the reference policy ---
    init_kl_coef: float = 0.1  # starting KL coefficient beta
    # weight of the per-token fluency penalty: the reference's surprise at each sampled token beyond its
    # entropy there (`excess_surprise`). KL alone lets the policy move mass into the reference's long tail
    # cheaply: a little KL, a large rise in the reference's NLL of the text (docs/ppo.md); 0 = off
    fluency_coef: float = 0.0
    target_kl: float = 1.0  # per-sequence KL (nats) the adaptive controller steers towards
    kl_horizon: int = 10000  # controller horizon (in sequences): larger = slower beta changes
    stop_kl: float | None = None  # stop once a rollout's KL (nats per sequence) exceeds this; None = never
    # stop once the reference's NLL of a rollout (nats per token) rises more than this over its own answers
    # to the same prompts; None = never. KL misses this drift: a little KL can steer answers into text the
    # reference finds far less likely (docs/ppo.md). Costs one reference answer per prompt on first sight
    stop_nll_rise: float | None = None

    def __post_init__(self) -> None:
        # (field, valid?, what a valid value is)
        rules = [
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("mini_batch_size", 1 <= self.mini_batch_size <= self.batch_size,
             f"an integer in [1, batch_size={self.batch_size}]"),
            ("mini_batch_size", self.batch_size % max(self.mini_batch_size, 1) == 0,
             f"a divisor of batch_size={self.batch_size}, so every mini-batch has the same size"),
            ("ppo_epochs", self.ppo_epochs >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate > 0, "a float > 0, e.g. 2e-4"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0 (0 = no warm-up)"),
            ("max_grad_norm", self.max_grad_norm > 0, "a float > 0, e.g. 1.0"),
            ("lora_rank", self.lora_rank >= 0, "an integer >= 0 (0 = full fine-tune)"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature > 0, "a float > 0, e.g. 1.0"),
            ("gamma", 0 <= self.gamma <= 1, "a float in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "a float in [0, 1]"),
            ("cliprange", self.cliprange > 0, "a float > 0, e.g. 0.2"),
            ("cliprange_value", self.cliprange_value > 0, "a float > 0, e.g. 0.2"),
            ("vf_coef", self.vf_coef >= 0, "a float >= 0, e.g. 0.1"),
            ("init_kl_coef", self.init_kl_coef >= 0, "a float >= 0, e.g. 0.1"),
            ("fluency_coef", self.fluency_coef >= 0, "a float >= 0 (0 = off), e.g. 0.03"),
            ("target_kl", self.target_kl > 0, "a float > 0 (nats per sequence), e.g. 1.0"),
            ("kl_horizon", self.kl_horizon > 0, "an integer > 0, e.g. 10000"),
            ("stop_kl", self.stop_kl is None or self.stop_kl > 0, "None or a float > 0 (nats per sequence)"),
            ("stop_nll_rise", self.stop_nll_rise is None or self.stop_nll_rise > 0,
             "None or a float > 0 (nats per token)"),
        ]
        for name, ok, valid in rules:
            if not ok:
                raise ValueError(f"PPOConfig.{name}={getattr(self, name)!r} is invalid: set it to {valid}")


# ----------------------------------------------------------------------------- pure functions


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}; pass tensors of one shape (B, R)")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (a scalar tensor)."""
    _check_same_shape(x=x, mask=mask)
    count = mask.sum()
    if count == 0:
        raise ValueError("mask is all zeros: the mean over no positions is undefined; pass a mask with a 1")
    return (x * mask).sum() / count


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`x` shifted to mean 0 and scaled to variance 1 over the masked positions; 0 elsewhere.

    Uses the biased variance (divide by the count), as whitening a whole batch needs no correction.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalized_rewards(
    scores: torch.Tensor,  # (B,) reward-model score of each response
    logprobs: torch.Tensor,  # (B, R) log pi(token) under the sampling policy
    ref_logprobs: torch.Tensor,  # (B, R) log pi_ref(token) under the reference policy
    mask: torch.Tensor,  # (B, R) 1 on real response tokens
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R) and the per-token KL estimate (B, R), both 0 where mask is 0.

    r_t = -kl_coef * (log pi - log pi_ref) at every token, plus the score at the last real
    token (Ziegler et al. 2019, eq. 2): the reward model judges whole responses only.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, mask {tuple(mask.shape)}: pass one score per row")
    if (mask.sum(-1) == 0).any():
        raise ValueError("a row of mask is all zeros: every response needs a real token to carry its score")
    kl = (logprobs - ref_logprobs) * mask  # (B, R)
    rewards = -kl_coef * kl  # (B, R)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # (B,) index of the last 1 in each row
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def excess_surprise(
    ref_logprobs: torch.Tensor,  # (B, R) log pi_ref(token) of the sampled tokens
    ref_entropy: torch.Tensor,  # (B, R) entropy of pi_ref at each of those positions, nats
    mask: torch.Tensor,  # (B, R) 1 on real response tokens
) -> torch.Tensor:
    """(B, R) the reference's surprise at each sampled token beyond what it expects there: -log pi_ref - H(pi_ref).

    Its mean is 0 on the reference's own samples; over a policy's samples it is how much more NLL per
    token the reference gives them than it expects of its own answers in the same contexts: the
    fluency drift docs/ppo.md measured while the KL stayed small. 0 where mask is 0.
    """
    _check_same_shape(ref_logprobs=ref_logprobs, ref_entropy=ref_entropy, mask=mask)
    return (-ref_logprobs - ref_entropy) * mask


def compute_gae(
    rewards: torch.Tensor,  # (B, R)
    values: torch.Tensor,  # (B, R) V(s_t), the value before token t is chosen
    mask: torch.Tensor,  # (B, R)
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates (B, R) and returns = advantages + values (B, R).

    A masked-out position is terminal: nothing flows back across it, and its advantage and
    return are 0 (Schulman et al. 2016, eq. 16).
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}, accumulated right to left
    zeros = torch.zeros_like(running)
    for t in reversed(range(length)):
        next_live = mask[:, t + 1] if t + 1 < length else zeros  # (B,) 0: t is the last live token
        next_value = values[:, t + 1] if t + 1 < length else zeros  # (B,)
        delta = rewards[:, t] + gamma * next_value * next_live - values[:, t]
        running = delta + gamma * lam * next_live * running
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,  # (B, R) under the policy being optimised
    old_logprobs: torch.Tensor,  # (B, R) under the policy that sampled
    advantages: torch.Tensor,  # (B, R)
    mask: torch.Tensor,  # (B, R)
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate loss (scalar) and the fraction of tokens where the clip bound (scalar).

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) (Schulman et al. 2017, eq. 7).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, R)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac.detach()


def value_loss(
    values: torch.Tensor,  # (B, R) under the value head being optimised
    old_values: torch.Tensor,  # (B, R) at rollout time
    returns: torch.Tensor,  # (B, R) GAE targets
    mask: torch.Tensor,  # (B, R)
    cliprange_value: float,
) -> torch.Tensor:
    """0.5 * mean(max((v - R)^2, (v_clipped - R)^2)), v_clipped within cliprange_value of old_values.

    The pessimistic max keeps one update from moving a value far from its rollout estimate
    (the value clipping of OpenAI baselines' PPO2, kept by Ziegler et al. 2019).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def response_mask(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """(B, R) long mask: 1 on tokens up to and including the first eos, 0 after it.

    `generate` fills finished rows with the pad token, which often is the eos token itself,
    so the first eos, not every pad, marks the end.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))  # (B, R)
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # (B, R) eos tokens strictly before t
    return (eos_before == 0).long()


def response_slice(x: torch.Tensor, response_len: int) -> torch.Tensor:
    """The positions of a (B, P + R, ...) output that predict the R response tokens: (B, R, ...).

    Position t's logits predict token t + 1, so the response tokens P..P+R-1 are predicted by
    positions P-1..P+R-2 (and a value V(s_t) belongs to the state before token t).
    """
    return x[:, -response_len - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) (B, R) from logits (B, R, V) at the sampling temperature."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, R, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy (B, R) in nats of the sampling distribution given logits (B, R, V)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, R, V)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKLController:
    """The KL coefficient beta, moved towards a target KL (Ziegler et al. 2019, section 2.2).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust beta after `n_steps` sequences whose mean per-sequence KL was `current_kl`."""
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def prompt_nll(prompts: list[str], ref_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per distinct prompt, the reference's NLL of its responses: (summed NLL, token count), each a mean over them.

    `ref_logprobs` and `mask` are (B, R), one row per entry of `prompts` (a prompt may repeat).
    """
    sums, counts = -(ref_logprobs * mask).sum(-1), mask.sum(-1).float()  # (B,), (B,)
    rows: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rows.setdefault(prompt, []).append(i)
    return {prompt: (sums[i].mean().item(), counts[i].mean().item()) for prompt, i in rows.items()}


def nll_rise(baseline: dict[str, tuple[float, float]], prompts: list[str], ref_logprobs: torch.Tensor,
             mask: torch.Tensor) -> float:
    """The reference's NLL per token of a rollout (B, R) minus that of its own answers to the same prompts.

    Paired by prompt because prompts differ far more than policies do: one policy's NLL per token
    ranged from 0.9 to 4.4 nats across 36 prompts, so two batches of different prompts say little.
    """
    rollout = (-(ref_logprobs * mask).sum() / mask.sum()).item()
    reference = sum(baseline[p][0] for p in prompts) / sum(baseline[p][1] for p in prompts)
    return rollout - reference


def warmup_learning_rate(learning_rate: float, step: int, warmup_steps: int) -> float:
    """The learning rate of PPO step `step` (1-based): `learning_rate` * step / (warmup_steps + 1) while warming up."""
    return learning_rate * min(1.0, step / (warmup_steps + 1))


def drift_reason(kl: float, rise: float | None, stop_kl: float | None, stop_nll_rise: float | None) -> str | None:
    """Why a rollout drifted too far from the reference to keep training (one line), or None.

    `kl` is the rollout's KL in nats per sequence; `rise` its `nll_rise` in nats per token (None: not measured).
    """
    if stop_kl is not None and kl > stop_kl:
        return f"rollout KL {kl:.2f} > stop_kl {stop_kl:.2f} nats per sequence"
    if stop_nll_rise is not None and rise is not None and rise > stop_nll_rise:
        return (f"the reference's NLL of the rollout rose {rise:+.2f} > stop_nll_rise {stop_nll_rise:.2f} nats "
                "per token over its own answers")
    return None


def steps_left(step: int, planned: int, kl: float | None, stop_kl: float | None) -> int:
    """Steps a run has yet to take after `step` of `planned`, for its ETA.

    Runs with a KL budget end on it long before their planned steps (every run of the preference suite
    did, docs/policy.md), so the rollout KL's growth so far, taken as linear (KL per step = kl / step),
    predicts when it will pass `stop_kl`; the run takes the step that passes it, then stops.
    """
    planned_left = max(0, planned - step)
    if stop_kl is None or kl is None or not math.isfinite(kl) or kl <= 0:
        return planned_left
    if kl > stop_kl:  # this rollout passed the budget: the run stops now
        return 0
    return min(planned_left, max(0, math.floor((stop_kl - kl) / (kl / step))) + 1)


# ----------------------------------------------------------------------------- models


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `module`'s trainable weights, by name: what an undone update is rolled back to."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back weights saved by `trainable_state`."""
    for name, p in module.named_parameters():
        if name in state:
            p.copy_(state[name])


@contextmanager
def peft_deprecation_silenced() -> Iterator[None]:
    """peft 0.21 reads the `is_gradient_checkpointing` that transformers 5 deprecated: silence that one
    warning while peft wraps a model (here and in trl's trainers). Drop it once peft reads
    `is_activation_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lora_target_modules(model: nn.Module) -> list[str]:
    """The attention projections (of `LORA_TARGETS`) that `model` has as linear layers."""
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    }
    if not found:
        raise ValueError(
            f"lora_rank > 0, but {type(model).__name__} has no linear layers named {LORA_TARGETS}: "
            "set lora_rank=0 to fine-tune every weight"
        )
    return sorted(found)


class PolicyWithValue(nn.Module):
    """The policy being trained, a scalar value head on its last hidden state, and its reference.

    The policy is a copy of `model`, so the caller's model (which may be serving candidates)
    is never written; that costs one copy of the weights (0.5 GB for SmolLM2-135M). The
    reference is that same copy with the LoRA adapters disabled when lora_rank > 0, and the
    caller's model itself, read under no_grad, when lora_rank == 0: never a third copy.
    """

    def __init__(self, model: PreTrainedModel, lora_rank: int):
        super().__init__()
        policy = copy.deepcopy(model)
        if lora_rank > 0:
            targets = lora_target_modules(policy)
            lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                              target_modules=targets, bias="none", task_type="CAUSAL_LM")
            with peft_deprecation_silenced():
                self.lm = get_peft_model(policy, lora)  # freezes the base weights
            reference = None
        else:
            self.lm = policy.requires_grad_(True)
            reference = model
        # object.__setattr__ keeps the reference out of the module tree, so parameters(),
        # state_dict() and train()/eval() never reach the caller's model
        object.__setattr__(self, "_reference", reference)
        self.value_head = nn.Linear(model.config.hidden_size, 1, dtype=model.dtype, device=model.device)
        # zero init: the first values are 0, so the first advantages are just the rewards, not noise
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # eval mode throughout: dropout would make the first ratio pi / pi_old differ from 1
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, L, V) and values (B, L) of left-padded sequences (B, L)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      output_hidden_states=True, use_cache=False)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)  # (B, L)
        return out.logits, values

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) of the reference policy, the model PPO started from."""
        if self._reference is not None:
            return causal_lm_logits(self._reference, input_ids, attention_mask)
        with self.lm.disable_adapter():
            return causal_lm_logits(self.lm, input_ids, attention_mask)

    @contextmanager
    def reference(self) -> Iterator[PreTrainedModel]:
        """The reference policy as a model to sample from (the LoRA adapters disabled while in use)."""
        if self._reference is not None:
            yield self._reference
        else:
            with self.lm.disable_adapter():
                yield self.lm

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def merged_model(self) -> PreTrainedModel:
        """The policy as a plain causal LM: LoRA merged into the weights, value head dropped, frozen."""
        model = self.lm.merge_and_unload() if isinstance(self.lm, PeftModel) else self.lm
        return model.eval().requires_grad_(False)


def causal_lm_logits(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) of `lm` on left-padded sequences (B, L), each row positioned as `generate` sampled it."""
    return lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
              use_cache=False).logits


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counted from each row's first real token, as `generate` numbers them.

    A plain forward numbers positions 0..L-1 whatever the padding, so left-padded rows would
    be scored at other positions than they were sampled at (transformers' generation/utils.py,
    `_prepare_position_ids_for_generation`). RoPE models (Llama, SmolLM2) are invariant to
    that shift; models with learned absolute positions (GPT-2, OPT) are not.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO's update needs about them (detached)."""

    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then response
    attention_mask: torch.Tensor  # (B, P + R) 1 on real prompt tokens and real response tokens
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first eos
    logprobs: torch.Tensor  # (B, R) under the policy that sampled
    values: torch.Tensor  # (B, R) under the value head at sampling time
    advantages: torch.Tensor  # (B, R) GAE, whitened over the batch
    returns: torch.Tensor  # (B, R) value targets


@dataclass
class PPOStepStats:
    step: int  # 1-based
    reward_mean: float  # mean reward-model score of the sampled responses
    kl: float  # mean over sequences of sum_t (log pi - log pi_ref), nats
    kl_coef: float  # the KL coefficient this step's rewards used
    ref_nll: float  # mean NLL per response token of the sampled text under the reference, nats
    nll_rise: float | None  # ref_nll minus the reference's own on the same prompts; None without stop_nll_rise
    excess_surprise: float  # mean per token of `excess_surprise`, nats: about 0 while the text stays fluent
    entropy: float  # mean per-token entropy of the sampling distribution, nats
    policy_loss: float  # mean over mini-batch updates
    value_loss: float  # mean over mini-batch updates
    clipfrac: float  # mean fraction of tokens whose policy ratio was clipped
    seconds: float  # wall time of this step
    eta_seconds: float  # estimated time left for the remaining steps
    rollout_seconds: float  # sampling, scoring and the log-prob/value passes of this step
    response_tokens: int  # real response tokens sampled this step (up to and including eos)


def prompt_batches(prompts: list[str], batch_size: int, seed: int) -> Iterator[list[str]]:
    """Endless batches of `batch_size` prompts, cycling through one seeded shuffle."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    start = 0
    while True:
        yield [order[(start + i) % len(order)] for i in range(batch_size)]
        start = (start + batch_size) % len(order)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's eos ids (it may list several) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | ({tokenizer.eos_token_id} - {None}))


@torch.no_grad()
def sample_responses(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: PPOConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """`lm`'s sampled sequences (B, P + R), their attention mask (B, P + R), response mask (B, R) and text."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(lm.device)
    sequences = lm.generate(
        **enc, do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0,
        max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
    )  # (B, P + R)
    response_ids = sequences[:, enc["input_ids"].shape[1]:]  # (B, R)
    mask = response_mask(response_ids, eos_token_ids(lm, tokenizer))  # (B, R)
    attention_mask = torch.cat([enc["attention_mask"], mask], dim=1)  # (B, P + R)
    # stripped like the candidates annotators saw (generation.py), the text the reward model learnt on
    responses = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
                 for ids, m in zip(response_ids, mask)]
    return sequences, attention_mask, mask, responses


def score_responses(reward_fn: RewardFn, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """(B,) float scores from `reward_fn`, checked to be one finite number per response."""
    scores = list(reward_fn(prompts, responses))
    if len(scores) != len(responses):
        raise ValueError(f"reward_fn returned {len(scores)} scores for {len(responses)} responses: "
                         "return one float per response")
    bad = [(i, s) for i, s in enumerate(scores) if not math.isfinite(float(s))]
    if bad:
        raise ValueError(f"reward_fn returned non-finite scores {bad} (index, score): return finite floats")
    return torch.tensor([float(s) for s in scores])


@torch.no_grad()
def evaluate_rollout(
    policy: PolicyWithValue, sequences: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs, values and entropies under the sampling policy, and log-probs and entropies under the
    reference: each (B, R)."""
    tokens = sequences[:, -response_len:]  # (B, R)
    logits, values = policy(sequences, attention_mask)  # (B, P + R, V), (B, P + R)
    logits = response_slice(logits, response_len)  # (B, R, V)
    ref_logits = response_slice(policy.reference_logits(sequences, attention_mask), response_len)  # (B, R, V)
    return (token_logprobs(logits, tokens, temperature), response_slice(values, response_len).float(),
            entropy_from_logits(logits, temperature), token_logprobs(ref_logits, tokens, temperature),
            entropy_from_logits(ref_logits, temperature))


@torch.no_grad()
def reference_prompt_nll(
    policy: PolicyWithValue, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: PPOConfig,
) -> dict[str, tuple[float, float]]:
    """The reference's NLL of its own sampled answers to `prompts`, per prompt as `prompt_nll` gives it."""
    with policy.reference() as reference:
        sequences, attention_mask, mask, _ = sample_responses(reference, tokenizer, prompts, config)
    ref_logits = response_slice(policy.reference_logits(sequences, attention_mask), mask.shape[1])  # (B, R, V)
    ref_logprobs = token_logprobs(ref_logits, sequences[:, -mask.shape[1]:], config.temperature)  # (B, R)
    return prompt_nll(prompts, ref_logprobs, mask)


# ----------------------------------------------------------------------------- optimisation


def ppo_update(
    policy: PolicyWithValue, optimizer: torch.optim.Optimizer, rollout: Rollout, config: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy + value loss over shuffled mini-batches; mean losses out."""
    response_len = rollout.response_mask.shape[1]
    history: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": []}
    for _ in range(config.ppo_epochs):
        for idx in torch.randperm(config.batch_size, generator=generator).split(config.mini_batch_size):
            mask = rollout.response_mask[idx]  # (b, R)
            logits, values = policy(rollout.input_ids[idx], rollout.attention_mask[idx])  # (b, P + R, V), (b, P + R)
            logprobs = token_logprobs(response_slice(logits, response_len), rollout.input_ids[idx, -response_len:],
                                      config.temperature)  # (b, R)
            pg, clipfrac = policy_loss(logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask, config.cliprange)
            vf = value_loss(response_slice(values, response_len).float(), rollout.values[idx], rollout.returns[idx],
                            mask, config.cliprange_value)
            optimizer.zero_grad(set_to_none=True)
            (pg + config.vf_coef * vf).backward()
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), config.max_grad_norm)
            optimizer.step()
            for name, value in (("policy_loss", pg), ("value_loss", vf), ("clipfrac", clipfrac)):
                history[name].append(value.item())
    return {name: sum(values) / len(values) for name, values in history.items()}


def train_ppo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    reward_fn: RewardFn,
    config: PPOConfig,
    on_step: Callable[[PPOStepStats], None] | None = None,
) -> tuple[PreTrainedModel, list[PPOStepStats]]:
    """Run `config.steps` PPO iterations from `model`; return the new plain policy and per-step stats.

    `model` (in eval mode, as `load_causal_lm` returns it) is both the starting policy and the
    KL reference; it is read, never written: training happens on a copy. Reseeds torch's
    global RNG with `config.seed`, because `generate` samples from it. With `config.stop_kl` or
    `config.stop_nll_rise`, the run may end before `config.steps`, undoing the update that overshot:
    the stats then cover only the updates kept (none when the first one overshot).
    """
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt to train on")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer.pad_token_id is None: set tokenizer.pad_token (load_causal_lm sets it to eos)")
    torch.manual_seed(config.seed)
    policy = PolicyWithValue(model, config.lora_rank)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=config.learning_rate)
    kl_controller = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
    batches = prompt_batches(prompts, config.batch_size, config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    stats: list[PPOStepStats] = []
    started = time.perf_counter()
    before_update: dict[str, torch.Tensor] | None = None  # trainable weights before the latest update
    baseline: dict[str, tuple[float, float]] = {}  # prompt -> the reference's NLL of its own answer (prompt_nll)
    for step in range(1, config.steps + 1):
        step_start = time.perf_counter()
        batch = next(batches)
        # rollout: sample one response per prompt from the current policy and score its text
        sequences, attention_mask, mask, responses = sample_responses(policy.lm, tokenizer, batch, config)
        scores = score_responses(reward_fn, batch, responses).to(sequences.device)  # (B,)
        # evaluate: log-probs and values at sampling time, log-probs under the reference
        logprobs, values, entropy, ref_logprobs, ref_entropy = evaluate_rollout(
            policy, sequences, attention_mask, mask.shape[1], config.temperature)
        # reward: the score at the last real token minus the per-token KL and fluency penalties
        rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_controller.value)
        surprise = excess_surprise(ref_logprobs, ref_entropy, mask)  # (B, R)
        rewards = rewards - config.fluency_coef * surprise
        kl_coef, kl_per_sequence = kl_controller.value, kl.sum(-1).mean().item()
        ref_nll = -masked_mean(ref_logprobs, mask).item()
        # fluency: the reference's NLL of this rollout against its own answers to the same prompts. Step 1
        # samples the reference itself (LoRA's B starts at 0); later prompts seen for the first time get
        # one reference answer each
        rise = None
        if config.stop_nll_rise is not None:
            if step == 1:
                baseline.update(prompt_nll(batch, ref_logprobs, mask))
            elif unseen := [p for p in dict.fromkeys(batch) if p not in baseline]:
                baseline.update(reference_prompt_nll(policy, tokenizer, unseen, config))
            rise = nll_rise(baseline, batch, ref_logprobs, mask)
        # early stop: the previous update took the policy too far from the reference. Undo it, so
        # the run returns the last policy whose rollout stayed within bounds (docs/ppo.md measured
        # SmolLM2 drifting into incoherent text once KL ran away despite the penalty)
        drift = drift_reason(kl_per_sequence, rise, config.stop_kl, config.stop_nll_rise)
        if drift is not None and before_update is not None:
            load_trainable_state(policy, before_update)
            stats.pop()  # that update is undone: stats describe the updates the returned policy holds
            log.warning("ppo stopped at step %d/%d: %s; kept the policy that sampled step %d",
                        step, config.steps, drift, step - 1)
            break
        # advantages: GAE, whitened over the batch so the step size does not depend on reward scale
        advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)
        rollout = Rollout(sequences, attention_mask, mask, logprobs, values, masked_whiten(advantages, mask), returns)
        rollout_seconds = time.perf_counter() - step_start
        # optimise: clipped policy + value losses over mini-batches
        if config.stop_kl is not None or config.stop_nll_rise is not None:
            before_update = trainable_state(policy)  # LoRA adapters and value head: a few MB
        for group in optimizer.param_groups:
            group["lr"] = warmup_learning_rate(config.learning_rate, step, config.warmup_steps)
        losses = ppo_update(policy, optimizer, rollout, config, generator)
        # adapt the KL coefficient to this rollout's KL per sequence
        kl_controller.update(kl_per_sequence, config.batch_size)
        # report
        now = time.perf_counter()
        stats.append(PPOStepStats(
            step=step, reward_mean=scores.mean().item(), kl=kl_per_sequence, kl_coef=kl_coef, ref_nll=ref_nll,
            nll_rise=rise, excess_surprise=masked_mean(surprise, mask).item(),
            entropy=masked_mean(entropy, mask).item(), **losses, seconds=now - step_start,
            eta_seconds=(now - started) / step * steps_left(step, config.steps, kl_per_sequence, config.stop_kl),
            rollout_seconds=rollout_seconds,
            response_tokens=int(mask.sum()),
        ))
        _log_step(stats[-1], config.steps)
        if on_step is not None:
            on_step(stats[-1])
    return policy.merged_model(), stats


def _log_step(s: PPOStepStats, steps: int) -> None:
    log.info(
        "ppo step %d/%d: reward %.4f kl %.4f (coef %.4f) ref_nll %.3f (rise %s, surprise %+.3f) entropy %.3f "
        "policy_loss %.4f value_loss %.4f clipfrac %.3f | rollout %.1fs update %.1fs eta %.0fs",
        s.step, steps, s.reward_mean, s.kl, s.kl_coef, s.ref_nll, "n/a" if s.nll_rise is None else f"{s.nll_rise:+.3f}",
        s.excess_surprise, s.entropy, s.policy_loss, s.value_loss,
        s.clipfrac, s.rollout_seconds, s.seconds - s.rollout_seconds, s.eta_seconds,
    )
