"""The RL step of the loop: a policy, prompts and a reward function in; a new plain policy and step stats out.

In:  the algorithm (one of `ALGORITHMS`), the previous policy (also the KL reference), its
     tokenizer, raw prompts, a `RewardFn` scoring decoded text (the reward model), and one
     `PPOConfig` whose schedule, sampling and LoRA fields every algorithm reads.
Out: the new policy as a plain causal LM (LoRA merged, eval mode) and one `StepStats` per step.

- "ppo":  backend/ppo.py, our own PPO with a value head (trl removed PPOTrainer after 1.12).
- "grpo": trl's GRPOTrainer (Shao et al. 2024): `group_size` samples per prompt, advantages
          relative to the group mean, no value model.
- "rloo": trl's RLOOTrainer (Ahmadian et al. 2024): the same groups, a leave-one-out baseline.
- "dpo":  trl's DPOTrainer (Rafailov et al. 2023) on the annotators' pairs themselves, not the
          reward model (backend/dpo.py); the reward model still judges the result on held-out prompts.
- "best_of_k": backend/best_of_k.py, rejection-sampling fine-tuning run online: `group_size` samples
          per prompt, one supervised step on each prompt's best (RAFT, Dong et al. 2023).
trl reads from the config: steps, batch_size (prompts per step), learning_rate, warmup_steps,
max_grad_norm, lora_rank, seed, max_new_tokens, temperature, init_kl_coef (as beta), cliprange (as
epsilon), stop_kl, which ends a run and undoes the update that overshot as PPO's does (without it
trl's RLOO ran to a KL of 17.5 nats in 16 steps, docs/ppo.md), fluency_coef, the weight of a
second reward function: PPO's per-token fluency penalty summed over each completion
(`fluency_reward_function`), and stop_nll_rise, which ends a run the same way once the reference's NLL
per token of a rollout rises that much over its NLL of the first rollout, the reference's own answers
(`reference_nll_function`, a reward function of weight 0). It does one optimisation pass per rollout and
has no value head or adaptive KL, so ppo_epochs, mini_batch_size, gamma, lam, cliprange_value, vf_coef
and target_kl are PPO's alone.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from backend.generation import render_prompt
from backend.ppo import (
    PPOConfig,
    PPOStepStats,
    RewardFn,
    drift_reason,
    entropy_from_logits,
    excess_surprise,
    load_trainable_state,
    lora_target_modules,
    peft_deprecation_silenced,
    prompt_batches,
    steps_left,
    token_logprobs,
    train_ppo,
    trainable_state,
)

if TYPE_CHECKING:
    from backend.dpo import DPOConfig  # noqa: F401 (annotations only)

log = logging.getLogger(__name__)

Pairs = tuple[list[str], list[str], list[str]]
"""Preference pairs as three aligned lists: prompts, chosen answers, rejected answers."""

ALGORITHMS = ("ppo", "grpo", "rloo", "dpo", "best_of_k")


@dataclass(frozen=True)
class StepStats:
    """One step of any algorithm, as the worker logs it and the UI shows it."""

    step: int  # 1-based rollout index
    reward_mean: float  # mean reward-model score of the step's samples
    kl: float | None  # KL to the starting policy, nats per sequence; None when not measured (trl with beta 0)
    entropy: float | None  # mean per-token entropy of the sampling distribution, nats; None when not logged
    seconds: float  # wall time of this step
    eta_seconds: float  # estimated time left for the remaining steps
    extra: dict[str, float] = field(default_factory=dict)  # the algorithm's own numbers (losses, kl_coef, ...)


def improve_policy(
    algorithm: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    reward_fn: RewardFn,
    config: PPOConfig,
    *,
    group_size: int = 4,
    on_step: Callable[[StepStats], None] | None = None,
    pairs: Pairs | None = None,
    dpo_config: DPOConfig | None = None,
) -> tuple[PreTrainedModel, list[StepStats]]:
    """Run one policy update of `model` with `algorithm`; `model` is read, never written.

    `group_size` is the number of samples per prompt of GRPO and RLOO (PPO samples one). DPO
    learns from `pairs` (prompts, chosen, rejected) with `dpo_config` and needs no `reward_fn`.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"RL_ALGORITHM={algorithm!r} is not supported: use one of {', '.join(ALGORITHMS)}")
    if algorithm == "dpo":
        from backend.dpo import DPOConfig, train_dpo  # imported here: backend.dpo imports StepStats from this module

        if not pairs or not pairs[0]:
            raise ValueError("RL_ALGORITHM=dpo needs preference pairs: pass pairs=(prompts, chosen, rejected)")
        return train_dpo(model, tokenizer, *pairs, dpo_config or DPOConfig(seed=config.seed), on_step=on_step)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt to train on")
    if algorithm == "ppo":
        def forward(s: PPOStepStats) -> None:
            if on_step is not None:
                on_step(from_ppo(s))

        trained, ppo_stats = train_ppo(model, tokenizer, prompts, reward_fn, config, on_step=forward)
        return trained, [from_ppo(s) for s in ppo_stats]
    if algorithm == "best_of_k":
        from backend.best_of_k import train_best_of_k  # imported here: backend.best_of_k imports StepStats from here

        return train_best_of_k(model, tokenizer, prompts, reward_fn, config, group_size, on_step=on_step)
    if group_size < 2:
        raise ValueError(f"group_size={group_size} is invalid for {algorithm}: set it to an integer >= 2, "
                         "as the group's other samples are each sample's baseline")
    return _train_trl(algorithm, model, tokenizer, prompts, reward_fn, config, group_size, on_step)


def normalised_to_candidates(reward_fn: RewardFn, candidates: dict[str, list[str]]) -> RewardFn:
    """`reward_fn` in units of the candidates annotators saw: minus, per prompt, their mean score,
    divided by the spread of their scores around those means (pooled over prompts).

    Centring: the reward model's score moves more between prompts than between answers to one
    prompt, and PPO's single sample per prompt cannot tell the two apart until its value head has
    learnt the prompts (GRPO's group mean plays the same part). Scaling: reward models differ in
    scale (a confident model's margins are ten times a cautious one's), while the KL coefficient
    prices reward in nats; in these units it means the same for every reward model. Ziegler et al.
    (2019) normalise the reward model on the base policy's samples the same way.
    Prompts without known candidates are only scaled.
    """
    baseline, deviations = {}, []
    for prompt, texts in candidates.items():
        if texts:
            scores = reward_fn([prompt] * len(texts), texts)
            baseline[prompt] = sum(scores) / len(scores)
            deviations += [s - baseline[prompt] for s in scores]
    spread = math.sqrt(sum(d * d for d in deviations) / len(deviations)) if deviations else 0.0
    unit = spread if spread > 1e-8 else 1.0  # candidates the model cannot tell apart: leave the scale alone

    def normalised(prompts: list[str], responses: list[str]) -> list[float]:
        return [(s - baseline.get(p, 0.0)) / unit for p, s in zip(prompts, reward_fn(prompts, responses))]

    return normalised


def from_ppo(s: PPOStepStats) -> StepStats:
    extra = {"kl_coef": s.kl_coef, "ref_nll": s.ref_nll, "excess_surprise": s.excess_surprise,
             "policy_loss": s.policy_loss, "value_loss": s.value_loss, "clipfrac": s.clipfrac, "rollout_seconds": s.rollout_seconds, "response_tokens": s.response_tokens}
    if s.nll_rise is not None:
        extra["nll_rise"] = s.nll_rise
    return StepStats(step=s.step, reward_mean=s.reward_mean, kl=s.kl, entropy=s.entropy, seconds=s.seconds,
                     eta_seconds=s.eta_seconds, extra=extra)


# ----------------------------------------------------------------------------- trl


def trl_reward_function(reward_fn: RewardFn) -> Callable[..., list[float]]:
    """`reward_fn` as a trl reward function `f(prompts=, completions=, **columns) -> list[float]`.

    trl hands conversational datasets' prompts and completions over as message lists
    (`[{"role": "assistant", "content": ...}]`) and plain ones as text, prompts rendered or not;
    either way we score the raw prompt, carried in the dataset's `raw_prompt` column, and the
    completion's stripped text: what the reward model saw in the annotators' pairs.
    """
    def reward_model(prompts: list, completions: list, raw_prompt: list[str], **_: object) -> list[float]:
        texts = [(c[-1]["content"] if isinstance(c, list) else c).strip() for c in completions]
        return [float(s) for s in reward_fn(list(raw_prompt), texts)]

    return reward_model


def reference_token_scores(reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, temperature: float,
                           raw_prompts: list[str], completion_ids: list[list[int]], batch_size: int = 8,
                           ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of `batch_size` completions, (log pi_ref of each completion token, pi_ref's entropy there, mask),
    each (b, R); scored on trl's `completion_ids` (eos included, as sampled) after the prompt as `render_prompt`
    renders it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    for start in range(0, len(completion_ids), batch_size):
        rows = [(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"], list(c))
                for p, c in zip(raw_prompts[start:start + batch_size], completion_ids[start:start + batch_size])]
        length, width = max(len(p) + len(c) for p, c in rows), max(max(len(c) for _, c in rows), 1)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)  # (b, L) right-padded prompt + completion
        attention = torch.zeros_like(ids)  # (b, L)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)  # (b, R) the completion tokens
        mask = torch.zeros_like(tokens)  # (b, R)
        at = torch.zeros((len(rows), width), dtype=torch.long)  # (b, R) position predicting each token
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attention[i, :len(p) + len(c)] = 1
            tokens[i, :len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, :len(c)] = 1
            at[i, :len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        logits = reference(input_ids=ids.to(reference.device), attention_mask=attention.to(reference.device),
                           use_cache=False).logits  # (b, L, V)
        logits = logits.gather(1, at.to(logits.device)[..., None].expand(-1, -1, logits.shape[-1]))  # (b, R, V)
        tokens, mask = tokens.to(logits.device), mask.to(logits.device)
        scores.append((token_logprobs(logits, tokens, temperature) * mask, entropy_from_logits(logits, temperature),
                       mask))
    return scores


def fluency_reward_function(reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, temperature: float,
                            batch_size: int = 8) -> Callable[..., list[float]]:
    """A trl reward function: minus the `excess_surprise` of `reference` summed over each completion's tokens.

    PPO's fluency penalty (backend/ppo.py) as a sequence reward, so that GRPO and RLOO pay for drifting
    into text the reference finds unlikely as PPO does: without it GRPO won "shorter" 0.958 while its
    answers' NLL under the base policy rose +1.64 nats/token (docs/policy.md). Its expectation is 0 on
    the reference's own samples at any length, so it favours neither short nor long answers.
    """

    @torch.no_grad()
    def fluency(prompts: list, completions: list, completion_ids: list[list[int]], raw_prompt: list[str],
                **_: object) -> list[float]:
        return [penalty for logprobs, entropy, mask in reference_token_scores(
                    reference, tokenizer, temperature, raw_prompt, completion_ids, batch_size)
                for penalty in (-excess_surprise(logprobs, entropy, mask).sum(-1)).tolist()]

    return fluency


def reference_nll_function(reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, temperature: float,
                           batch_size: int = 8) -> Callable[..., list[float]]:
    """A trl reward function of weight 0: the reference's NLL of each completion per token (0 for an empty one).

    trl logs its mean as `rewards/reference_nll/mean`, from which `_StepRecorder` stops a run on
    `stop_nll_rise`. Not the fluency penalty's excess surprise: once a text turns odd the reference is unsure
    of what comes next, its entropy rises with its surprise, and the excess stays small. GRPO's "shorter"
    stopped at a rollout excess of +0.51 nats/token while its held-out answers' NLL rose +1.12
    (docs/policy.md). The guard rails judge the NLL itself, as this does.
    """

    @torch.no_grad()
    def reference_nll(prompts: list, completions: list, completion_ids: list[list[int]], raw_prompt: list[str],
                      **_: object) -> list[float]:
        return [nll for logprobs, _entropy, mask in reference_token_scores(
                    reference, tokenizer, temperature, raw_prompt, completion_ids, batch_size)
                for nll in (-logprobs.sum(-1) / mask.sum(-1).clamp(min=1)).tolist()]

    return reference_nll


def _dataset(tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: PPOConfig):
    """`steps * batch_size` rows in PPO's prompt order: conversational with a chat template, else rendered text."""
    from datasets import Dataset  # imported here: `datasets` is only needed by the trl algorithms

    order = [p for batch in islice(prompt_batches(prompts, config.batch_size, config.seed), config.steps) for p in batch]
    chat = bool(tokenizer.chat_template)
    rows = [{"prompt": [{"role": "user", "content": p}] if chat else render_prompt(tokenizer, p), "raw_prompt": p}
            for p in order]
    return Dataset.from_list(rows)


class _StepRecorder(TrainerCallback):
    """Turns trl's per-step log into `StepStats`, with an ETA from the mean step time so far (`steps_left`), and
    stops the run once a step's rollout KL passes `stop_kl`, or the reference's NLL per token of its rollout
    rises more than `stop_nll_rise` over that of the first rollout (the reference's own answers).

    trl logs step k after its update, from the rollout that the policy before it sampled. So, as
    PPO does, a rollout past either bound undoes the update that produced its policy (step k - 1's)
    and step k's own: the weights go back to those at the start of step k - 1.
    """

    def __init__(self, steps: int, on_step: Callable[[StepStats], None] | None, stop_kl: float | None,
                 stop_nll_rise: float | None = None):
        self.steps, self.on_step, self.stats = steps, on_step, []
        self.stop_kl, self.stop_nll_rise = stop_kl, stop_nll_rise
        self.reference_nll: float | None = None  # nats/token of the first rollout, sampled by the reference
        self.started = self.last = time.perf_counter()
        self.snapshots: list[dict[str, torch.Tensor]] = []  # trainable weights at the start of the last 2 steps

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if (self.stop_kl is not None or self.stop_nll_rise is not None) and model is not None:
            self.snapshots = [*self.snapshots[-1:], trainable_state(model)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:  # the final summary log has no reward
            return
        now, step = time.perf_counter(), state.global_step
        length = logs.get("completions/mean_length", math.nan)
        # trl logs the mean per-token KL; per sequence, as PPO's, for one PPO_MAX_KL across algorithms
        kl = logs["kl"] * length if "kl" in logs else None
        extra = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)
                 and k not in ("reward", "kl", "entropy", "epoch", "step")}
        eta = (now - self.started) / step * steps_left(step, self.steps, kl, self.stop_kl)
        # the reward model's own mean: trl's "reward" adds the fluency penalty's weighted mean to it
        reward = logs.get("rewards/reward_model/mean", logs["reward"])
        s = StepStats(step=step, reward_mean=float(reward), kl=kl, entropy=logs.get("entropy"),
                      seconds=now - self.last, eta_seconds=eta, extra=extra)
        self.last = now
        self.stats.append(s)
        log.info("%s step %d/%d: reward %.4f kl %s entropy %s | %.1fs eta %.0fs", args.run_name, s.step, self.steps,
                 s.reward_mean, "n/a" if kl is None else f"{kl:.4f}",
                 "n/a" if s.entropy is None else f"{s.entropy:.3f}", s.seconds, s.eta_seconds)
        if self.on_step is not None:
            self.on_step(s)
        drift = drift_reason(math.nan if kl is None else kl, self.nll_rise(logs), self.stop_kl, self.stop_nll_rise)
        if drift is not None and len(self.snapshots) == 2:
            load_trainable_state(kwargs["model"], self.snapshots[0])
            del self.stats[-2:]  # both updates are undone: stats describe the updates the policy holds
            control.should_training_stop = True
            log.warning("%s stopped at step %d/%d: %s; kept the policy that sampled step %d", args.run_name, step,
                        self.steps, drift, step - 1)

    def nll_rise(self, logs: dict) -> float | None:
        """The reference's NLL per token of this rollout over that of the first one (None without
        `reference_nll_function`): the NLL rise the guard rails judge, measured on the rollout. The first
        rollout's prompts are not this one's, so it carries their difference too (PPO samples the reference
        on each prompt instead, one more generation per new prompt)."""
        nll = logs.get("rewards/reference_nll/mean")
        if nll is None:
            return None
        if self.reference_nll is None:
            self.reference_nll = float(nll)
        return float(nll) - self.reference_nll


def _train_trl(
    algorithm: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
    reward_fn: RewardFn, config: PPOConfig, group_size: int, on_step: Callable[[StepStats], None] | None,
) -> tuple[PreTrainedModel, list[StepStats]]:
    # imported here: `import trl` takes seconds (shared/models/README.md), and PPO needs none of it
    if algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    policy = copy.deepcopy(model)  # trl injects LoRA layers into the model it gets: keep the caller's clean
    peft_config = None
    if config.lora_rank > 0:
        peft_config = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                                 target_modules=lora_target_modules(policy), bias="none", task_type="CAUSAL_LM")
    reward_funcs, reward_weights = [trl_reward_function(reward_fn)], None
    if config.fluency_coef > 0:  # `model` is the previous policy: the reference, as in PPO
        reward_funcs.append(fluency_reward_function(model, tokenizer, config.temperature))
        reward_weights = [1.0, config.fluency_coef]
    if config.stop_nll_rise is not None:  # measured, not optimised: weight 0
        reward_funcs.append(reference_nll_function(model, tokenizer, config.temperature))
        reward_weights = [*(reward_weights or [1.0]), 0.0]
    recorder = _StepRecorder(config.steps, on_step, config.stop_kl, config.stop_nll_rise)
    with tempfile.TemporaryDirectory(prefix=f"rl-{algorithm}-") as output_dir:
        args = Config(
            output_dir=output_dir, run_name=algorithm, report_to=[], save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=config.seed, data_seed=config.seed, shuffle_dataset=False,
            # CPU: trl defaults to bf16 and gradient checkpointing (2.5x slower here, shared/models/README.md);
            # transformers 5 renamed gradient_checkpointing to activation_checkpointing
            bf16=False, use_cpu=model.device.type == "cpu", activation_checkpointing=False,
            dataloader_num_workers=0, max_steps=config.steps,
            per_device_train_batch_size=config.batch_size * group_size,
            gradient_accumulation_steps=1, num_generations=group_size, num_iterations=1,
            learning_rate=config.learning_rate, lr_scheduler_type="constant_with_warmup",
            warmup_steps=config.warmup_steps,
            max_grad_norm=config.max_grad_norm, beta=config.init_kl_coef, epsilon=config.cliprange,
            max_completion_length=config.max_new_tokens, temperature=config.temperature, top_k=0, top_p=1.0,
            log_completions=False, reward_weights=reward_weights,
        )
        with peft_deprecation_silenced():
            trainer = Trainer(
                model=policy, reward_funcs=reward_funcs, args=args,
                train_dataset=_dataset(tokenizer, prompts, config), processing_class=tokenizer,
                callbacks=[recorder], peft_config=peft_config,
            )
            trainer.remove_callback(PrinterCallback)  # prints every log dict; _StepRecorder logs instead
            trainer.train()
    return plain_policy(trainer.model), recorder.stats


def plain_policy(trained: PreTrainedModel) -> PreTrainedModel:
    """A trl trainer's model as a plain, frozen causal LM: LoRA merged, trl's instance `forward` dropped.

    trl patches an instance `forward` onto the model it trains that calls *this* object's weights: a
    deepcopy of it (the next round's policy) would run these weights, not its own (tests/test_dpo.py).
    """
    trained = trained.merge_and_unload() if hasattr(trained, "merge_and_unload") else trained
    trained.__dict__.pop("forward", None)
    return trained.eval().requires_grad_(False)
