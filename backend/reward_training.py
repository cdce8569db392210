"""Reward-model updates: one project's preference pairs in, a gated, published reward-model version of it out.

One `fit_reward_version` call per `fit_reward` job (a burst of annotations folds into one job):
1. split the pairs by prompt into training and held-out (`is_held_out`; never by pair);
2. default tier: an incremental update of the serving head on the pairs new since it was published
   plus a replay sample of older ones, or a full refit every `full_refit_every` updates (guards
   against drift) and after pairs were deleted; fine-tuned tier: trl's RewardTrainer with LoRA;
3. evaluate the candidate and the serving model on the same held-out pairs (accuracy, calibration);
4. publish only if the candidate is not worse than the serving model beyond noise (`should_publish`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from backend.reward import (
    FineTunedRewardModel,
    RewardModel,
    finetune_text,
    is_held_out,
    refit,
    refit_incrementally,
    score_margins,
)
from backend.store import Store

log = logging.getLogger(__name__)


class Pair(Protocol):
    """What training reads from a preference pair (the store's PairRow has these and more)."""
    id: int
    prompt: str
    chosen: str
    rejected: str
    margin: float


@dataclass(frozen=True)
class UpdatePolicy:
    replay_pairs: int = 256  # older training pairs replayed beside the new ones in an incremental update
    full_refit_every: int = 10  # incremental updates between full refits of the head
    incremental_iters: int = 30  # L-BFGS iterations of a warm-started incremental update
    finetune_epochs: int = 2  # epochs of the fine-tuned tier (RewardTrainer)
    finetune_lora_rank: int = 8  # LoRA rank of the fine-tuned tier; 0 trains every weight


@dataclass(frozen=True)
class PairRecord:
    """A preference pair read from a file (the store's PairRow plays this part inside the loop)."""
    id: int
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


def read_pairs(path: Path) -> list[PairRecord]:
    """prompt/chosen/rejected(/margin) JSONL, one pair a line; a bad line raises with its number."""
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{path}:{number}: each line needs string fields 'prompt', 'chosen' and 'rejected'")
        pairs.append(PairRecord(number, row["prompt"], row["chosen"], row["rejected"], float(row.get("margin", 0.0))))
    if not pairs:
        raise ValueError(f"{path} holds no pairs: expected JSONL lines of prompt/chosen/rejected")
    return pairs


# --- evaluation ---
@dataclass(frozen=True)
class Evaluation:
    pairs: int
    accuracy: float | None  # share of pairs where r(chosen) > r(rejected); ties count as wrong
    accuracy_low: float | None  # 95% Wilson interval
    accuracy_high: float | None
    log_loss: float | None  # mean -log sigmoid(margin): Bradley-Terry's own calibration measure
    ece: float | None  # expected calibration error of P(chosen beats rejected), 10 bins of confidence


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion; sane at 0 and n (unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def expected_calibration_error(margins: np.ndarray, bins: int = 10) -> float:
    """|confidence - accuracy| averaged over confidence bins, where confidence = max(p, 1-p), p = sigmoid(margin)."""
    p = 1.0 / (1.0 + np.exp(-margins))
    confidence, correct = np.maximum(p, 1 - p), (margins > 0).astype(float)
    which = np.minimum(((confidence - 0.5) * 2 * bins).astype(int), bins - 1)
    return float(sum(abs(confidence[which == b].mean() - correct[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / len(margins))


def evaluate_margins(margins: np.ndarray) -> Evaluation:
    """Metrics of r(chosen) - r(rejected) over held-out pairs (shape (N,))."""
    n = len(margins)
    if n == 0:
        return Evaluation(0, None, None, None, None, None)
    correct = int((margins > 0).sum())
    low, high = wilson_interval(correct, n)
    log_loss = float(np.mean(np.logaddexp(0.0, -margins)))
    return Evaluation(n, correct / n, low, high, log_loss, expected_calibration_error(margins))


def pair_margins(model, pairs: Sequence[Pair]) -> np.ndarray:
    """(N,) r(chosen) - r(rejected) of either tier on stored pairs."""
    return score_margins(model, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])


def should_publish(candidate: np.ndarray, serving: np.ndarray, z: float = 1.96) -> tuple[bool, str]:
    """Paired check on the same held-out pairs (McNemar): refuse only if the candidate is worse beyond noise.

    b = pairs only the serving model gets right, c = pairs only the candidate gets right; under
    "equally good", b - c has standard deviation sqrt(b + c).
    """
    b = int(((serving > 0) & ~(candidate > 0)).sum())
    c = int((~(serving > 0) & (candidate > 0)).sum())
    if b - c > z * math.sqrt(b + c):
        return False, f"worse than the serving model on held-out pairs ({b} lost vs {c} won, beyond noise)"
    return True, f"held-out pairs: {c} won, {b} lost against the serving model"


# --- the default tier: four Bradley-Terry heads, on cached embeddings, character n-grams and structure counts ---
def update_head(serving: RewardModel, train: Sequence[Pair], last_pair_id: int, trained_pairs: int,
                updates_since_full: int, policy: UpdatePolicy, rng: random.Random,
                force_full: bool = False) -> tuple[RewardModel, bool]:
    """(new model, whether it was a full refit) from the training pairs and the serving model's bookkeeping."""
    new = [p for p in train if p.id > last_pair_id]
    old = [p for p in train if p.id <= last_pair_id]
    full = (force_full or serving.version is None or updates_since_full + 1 >= policy.full_refit_every
            or len(old) < trained_pairs)  # fewer old pairs than it learnt from: some were deleted
    batch = list(train) if full else new + rng.sample(old, min(policy.replay_pairs, len(old)))
    texts = ([p.prompt for p in batch], [p.chosen for p in batch], [p.rejected for p in batch])
    margin = np.array([p.margin for p in batch], dtype=np.float64)
    if full:
        return refit(serving, *texts, margin), True
    return refit_incrementally(serving, *texts, margin, len(train), policy.incremental_iters), False


# --- the fine-tuned tier: trl's RewardTrainer, LoRA, on CPU ---
def finetune_reward_model(base: str, prompts: list[str], chosen: list[str], rejected: list[str],
                          margins: list[float], policy: UpdatePolicy, output_dir: Path,
                          seed: int = 0) -> FineTunedRewardModel:
    """Any HF sequence-classification checkpoint (`base`) trained on the pairs; LoRA merged back in."""
    from datasets import Dataset  # trl and datasets take seconds to import: only this tier pays for them
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({
        "chosen": [finetune_text(p, c) for p, c in zip(prompts, chosen)],
        "rejected": [finetune_text(p, r) for p, r in zip(prompts, rejected)],
        "margin": list(margins),
    })
    config = RewardConfig(
        output_dir=str(output_dir), num_train_epochs=policy.finetune_epochs, per_device_train_batch_size=8,
        learning_rate=1e-4 if policy.finetune_lora_rank else 2e-5, seed=seed, report_to="none",
        save_strategy="no", logging_steps=10, max_length=512,
        # trl's defaults (bf16, gradient checkpointing) were 2.5x slower on CPU (shared/models/README.md);
        # a GPU, where there is one, trains this tier in seconds
        bf16=False, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        # BERT-style tokenizers have no eos token; RewardTrainer appends one to every text
        eos_token=tokenizer.eos_token or tokenizer.sep_token,
    )
    peft_config = (LoraConfig(r=policy.finetune_lora_rank, lora_alpha=2 * policy.finetune_lora_rank,
                              task_type="SEQ_CLS", target_modules="all-linear")
                   if policy.finetune_lora_rank else None)
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)
    trainer.train()
    trained = trainer.model.merge_and_unload() if peft_config is not None else trainer.model
    return FineTunedRewardModel(trained, tokenizer)


# --- one update, end to end ---
@dataclass(frozen=True)
class RewardUpdate:
    version: int | None  # the published version, or None when the gate refused the candidate
    reason: str
    metrics: dict


def fit_reward_version(store: Store, project_id: int, serving, reward_dir: Callable[[int], Path],
                       policy: UpdatePolicy, finetune_base: str | None = None, seed: int = 0,
                       full_refit: bool = False) -> RewardUpdate:
    """Train a candidate on the project's pairs, evaluate it beside `serving`, publish it if the gate agrees.

    `serving` is the newest published model of either tier (or the untrained head, version None);
    `finetune_base` set means the fine-tuned tier, trained from that checkpoint; `full_refit` refits
    the heads from scratch even where an incremental update is due.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    pairs = store.pairs(project_id)
    if not pairs:
        return RewardUpdate(None, "no preference pairs yet", {})
    latest = store.latest_version("reward", project_id)
    book = latest.metrics if latest else {}
    # split by prompt: held-out pairs are never trained on, by any version
    held = [p for p in pairs if is_held_out(p.prompt)]
    train = [p for p in pairs if not is_held_out(p.prompt)] or pairs  # a few prompts may all be held out

    # train a candidate
    if finetune_base is not None:
        with tempfile.TemporaryDirectory() as scratch:
            candidate = finetune_reward_model(finetune_base, [p.prompt for p in train], [p.chosen for p in train],
                                              [p.rejected for p in train], [p.margin for p in train], policy,
                                              Path(scratch), seed=seed)
        full = True
    else:
        if not isinstance(serving, RewardModel):
            raise ValueError(f"the serving reward model is the {serving.tier!r} tier but no fine-tune base was "
                             "given: pass finetune_base, or roll back to a head version first")
        candidate, full = update_head(serving, train, int(book.get("last_pair_id", 0)),
                                      int(book.get("train_pairs", 0)), int(book.get("updates_since_full_refit", 0)),
                                      policy, random.Random(seed + len(pairs)), force_full=full_refit)
    timings["train_seconds"] = time.perf_counter() - started

    # evaluate candidate and serving model on the same held-out pairs
    mark = time.perf_counter()
    candidate_margins = pair_margins(candidate, held)
    evaluation = evaluate_margins(candidate_margins)
    if serving.version is None:
        publish, reason = True, "first trained version"
    elif not held:
        publish, reason = True, "no held-out pairs yet: published unchecked"
    else:
        publish, reason = should_publish(candidate_margins, pair_margins(serving, held))
    timings["eval_seconds"] = time.perf_counter() - mark

    metrics = {
        "tier": candidate.tier, "full_refit": full, "train_pairs": len(train), "held_out_pairs": len(held),
        "held_out_accuracy": evaluation.accuracy, "held_out_accuracy_low": evaluation.accuracy_low,
        "held_out_accuracy_high": evaluation.accuracy_high, "held_out_log_loss": evaluation.log_loss,
        "held_out_ece": evaluation.ece, "last_pair_id": max(p.id for p in pairs),
        "updates_since_full_refit": 0 if full else int(book.get("updates_since_full_refit", 0)) + 1,
        "l2_per_pair": candidate.embedding.l2_per_pair if candidate.tier == "head" else None, **timings,
    }
    if not publish:
        store.log_event("reward_refused", f"reward candidate not published: {reason}", project=project_id, **metrics)
        return RewardUpdate(None, reason, metrics)

    # save atomically, then publish: readers only ever see complete versions
    version = max(1, store.next_version("reward", project_id))  # v0 is the untrained, all-zero head
    candidate.version = version
    candidate.save(reward_dir(version))
    metrics["seconds"] = time.perf_counter() - started
    store.publish_version("reward", project_id, version, str(reward_dir(version)), pairs_seen=len(pairs),
                          metrics=metrics)
    accuracy = "n/a" if evaluation.accuracy is None else f"{evaluation.accuracy:.3f}"
    store.log_event("reward", f"reward model v{version} ({candidate.tier}, {'full refit' if full else 'incremental'}) "
                    f"on {len(train)} pairs: held-out accuracy {accuracy} on {len(held)} pairs, "
                    f"{metrics['seconds']:.2f}s; {reason}", project=project_id, version=version, **metrics)
    return RewardUpdate(version, reason, metrics)


def rollback_reward(store: Store, project_id: int, version: int) -> int:
    """Serve the project's reward `version` again (every newer version is retired); returns how many were retired."""
    target = next((v for v in store.versions("reward", project_id) if v.version == version), None)
    if target is not None and not Path(target.path).exists():
        raise ValueError(f"reward version {version} points at {target.path}, which is gone: pick another version")
    retired = store.rollback("reward", project_id, version)  # raises ValueError naming the known versions
    store.log_event("reward", f"reward model rolled back to v{version} ({retired} newer version(s) retired)",
                    project=project_id, version=version, retired=retired)
    return retired
