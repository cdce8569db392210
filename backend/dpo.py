"""DPO from the rankings: preference pairs in; a new plain policy and step stats out.

In:  the serving policy (a plain causal LM, also the reference), its tokenizer, preference pairs as
     three aligned lists (raw prompts, chosen answers, rejected answers: the stripped text annotators
     ranked), and a `DPOConfig`.
Out: the new policy as a plain causal LM (LoRA merged, eval mode, frozen) and one
     `backend.rl.StepStats` per optimisation step.

Why: iterative on-policy DPO (Rafailov et al. 2023, "Direct Preference Optimization"; run in rounds as
in Xu et al. 2023, "Some things are more CRINGE than others", and Yuan et al. 2024, "Self-Rewarding
Language Models"). Each round's pairs are the serving policy's own samples, ranked by annotators, and
the reference is that same serving policy, so the update learns from the ranking itself, without a
reward model in between, and its implicit KL anchor is the policy that wrote the pairs.

trl's DPOTrainer does the work. Answers are trained exactly as candidates were sampled
(backend/generation.py): after the chat template's generation prompt when the tokenizer has one,
else after `render_prompt`'s "prompt\\n"; trl appends the end-of-turn / eos token the sampler stopped on.

`StepStats` comes from backend.rl at module level: backend.rl imports this module lazily, inside
`improve_policy`, so there is no import cycle. Keep it that way (or move `StepStats` to a module of its own).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from backend.generation import render_prompt
from backend.ppo import lora_target_modules, peft_deprecation_silenced
from backend.rl import StepStats, plain_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPOConfig:
    # --- schedule ---
    epochs: int = 2  # passes over the round's pairs
    batch_size: int = 8  # pairs per optimisation step (each step runs 2 * batch_size sequences)
    # Adam learning rate. Papers' full fine-tunes use 5e-7 to 1e-6 (Rafailov et al. 2023; Zephyr), but LoRA wants
    # about 10x a full fine-tune's rate (Schulman et al. 2025, "LoRA Without Regret") and a round is only a few
    # steps over a few dozen pairs; beta bounds the drift. Same order as PPOConfig's 2e-4. Lower it for lora_rank=0
    learning_rate: float = 1e-4
    warmup_steps: int = 0  # steps whose learning rate ramps up linearly from 0; then constant; 0 = none
    max_grad_norm: float = 1.0  # clip of the global gradient norm
    seed: int = 0  # seeds LoRA initialisation and the order of pairs
    # --- loss ---
    beta: float = 0.1  # DPO temperature: weight of the implicit KL to the reference; higher = stays closer
    # --- model ---
    lora_rank: int = 16  # LoRA rank on q/k/v/o projections (alpha = 2 * rank); 0 = full fine-tune
    # tokens of prompt + answer kept (the answer's end is cut); pairs whose prompt alone fills it are dropped
    max_length: int = 256

    def __post_init__(self) -> None:
        # (field, valid?, what a valid value is)
        rules = [
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate > 0, "a float > 0, e.g. 1e-4"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0 (0 = no warm-up)"),
            ("max_grad_norm", self.max_grad_norm > 0, "a float > 0, e.g. 1.0"),
            ("beta", self.beta > 0, "a float > 0, e.g. 0.1"),
            ("lora_rank", self.lora_rank >= 0, "an integer >= 0 (0 = full fine-tune)"),
            ("max_length", self.max_length >= 2, "an integer >= 2 (prompt + answer tokens), e.g. 256"),
        ]
        for name, ok, valid in rules:
            if not ok:
                raise ValueError(f"DPOConfig.{name}={getattr(self, name)!r} is invalid: set it to {valid}")
        if self.lora_rank == 0 and self.learning_rate > 1e-5:
            warnings.warn(f"DPOConfig.learning_rate={self.learning_rate!r} with lora_rank=0 moves every weight at a "
                          "LoRA rate: set learning_rate to about 1e-6 for a full fine-tune", stacklevel=3)


def preference_rows(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chosen: list[str],
                    rejected: list[str]) -> list[dict]:
    """trl's preference rows: conversational with a chat template (trl renders the prompt with the
    generation prompt, as `render_prompt` does), else the text `render_prompt` gives the sampler."""
    if tokenizer.chat_template:
        return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}]} for p, c, r in zip(prompts, chosen, rejected)]
    return [{"prompt": render_prompt(tokenizer, p), "chosen": c, "rejected": r}
            for p, c, r in zip(prompts, chosen, rejected)]


class _StepRecorder(TrainerCallback):
    """Turns trl's per-step log into `StepStats`, with an ETA from the mean step time so far.

    reward_mean is trl's `rewards/margins`: the batch mean of beta * (chosen - rejected) log-ratio to the
    reference, the implicit reward gap DPO widens (0 at step 1, where policy = reference). `rewards/chosen`
    alone also falls when both answers lose probability, which DPO often does (Pal et al. 2024, "Smaug").
    """

    def __init__(self, on_step: Callable[[StepStats], None] | None):
        self.on_step, self.stats = on_step, []
        self.started = self.last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last = time.perf_counter()  # not the dataset tokenisation before it

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "rewards/margins" not in logs:  # the final summary log has no metrics
            return
        now, step = time.perf_counter(), state.global_step
        extra = {k: float(v) for k, v in logs.items()
                 if isinstance(v, int | float) and k not in ("rewards/margins", "epoch", "step")}
        extra["max_steps"] = state.max_steps
        s = StepStats(step=step, reward_mean=float(logs["rewards/margins"]), kl=None, entropy=None,
                      seconds=now - self.last, eta_seconds=(now - self.started) / step * (state.max_steps - step),
                      extra=extra)
        self.last = now
        self.stats.append(s)
        log.info("dpo step %d/%d: margin %.4f loss %.4f accuracy %.2f | %.1fs eta %.0fs", step, state.max_steps,
                 s.reward_mean, extra.get("loss", float("nan")), extra.get("rewards/accuracies", float("nan")),
                 s.seconds, s.eta_seconds)
        if self.on_step is not None:
            self.on_step(s)


def _check_pairs(prompts: list[str], chosen: list[str], rejected: list[str]) -> None:
    lengths = {"prompts": len(prompts), "chosen": len(chosen), "rejected": len(rejected)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"prompts, chosen and rejected differ in length ({lengths}): "
                         "pass one prompt, one chosen and one rejected answer per pair")
    if not prompts:
        raise ValueError("prompts, chosen and rejected are empty: pass at least one preference pair")


def train_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    config: DPOConfig,
    on_step: Callable[[StepStats], None] | None = None,
) -> tuple[PreTrainedModel, list[StepStats]]:
    """DPO of `model` on the pairs (prompts[i], chosen[i] preferred to rejected[i]); `model` is read, never written.

    The reference is `model` as it is now: with LoRA, the trained copy with its adapters disabled; with
    lora_rank=0, a second, frozen copy (trl would otherwise reload the checkpoint `model` came from, which
    is not the serving policy after the first round).
    """
    _check_pairs(prompts, chosen, rejected)
    from datasets import Dataset  # imported here, as trl: only the trl algorithms need them, and they take seconds
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    # copy the serving policy: trl injects LoRA layers and patches forward on the model it gets
    policy = copy.deepcopy(model)
    peft_config, ref_model = None, None
    if config.lora_rank > 0:
        peft_config = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                                 target_modules=lora_target_modules(policy), bias="none", task_type="CAUSAL_LM")
    else:
        ref_model = copy.deepcopy(model).requires_grad_(False)
    recorder = _StepRecorder(on_step)
    with tempfile.TemporaryDirectory(prefix="rl-dpo-") as output_dir:
        args = TrlDPOConfig(
            output_dir=output_dir, run_name="dpo", report_to=[], save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=config.seed, data_seed=config.seed,
            # CPU: trl defaults to bf16 and gradient checkpointing (2.5x slower here, shared/models/README.md);
            # transformers 5 renamed gradient_checkpointing to activation_checkpointing
            bf16=False, use_cpu=model.device.type == "cpu", activation_checkpointing=False,
            dataloader_num_workers=0, num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=1,
            learning_rate=config.learning_rate, lr_scheduler_type="constant_with_warmup",
            warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
            beta=config.beta, loss_type=["sigmoid"], max_length=config.max_length,
        )
        with peft_deprecation_silenced():
            trainer = DPOTrainer(
                model=policy, ref_model=ref_model, args=args, processing_class=tokenizer,
                train_dataset=Dataset.from_list(preference_rows(tokenizer, prompts, chosen, rejected)),
                callbacks=[recorder], peft_config=peft_config,
            )
            _check_kept(len(trainer.train_dataset), len(prompts), config.max_length)
            trainer.remove_callback(PrinterCallback)  # prints every log dict; _StepRecorder logs instead
            trainer.train()
    return plain_policy(trainer.model), recorder.stats


def _check_kept(kept: int, pairs: int, max_length: int) -> None:
    """trl drops pairs whose prompt alone fills max_length: raise if none is left, warn if some went."""
    if kept == 0:
        raise ValueError(f"every prompt fills DPOConfig.max_length={max_length} tokens, so no pair is left to train "
                         "on: raise max_length")
    if kept < pairs:
        log.warning("dpo: %d of %d pairs dropped, their prompt fills DPOConfig.max_length=%d tokens: raise max_length "
                    "to train on them", pairs - kept, pairs, max_length)
