"""Reward model: (prompt, response) texts in, a scalar score out; preference pairs in, a new model out.

Two tiers behind one interface (`score(prompts, responses) -> list[float]`, `save(dir)`, `version`):
- `RewardModel`, the default: a frozen sentence encoder (MiniLM) whose mean-pooled embeddings are
  cached per text in the store, plus a linear Bradley-Terry head over features of the last human
  turn and the response. Fitting the head on cached embeddings takes milliseconds, so the reward
  model follows the annotators within seconds of each ranking.
- `FineTunedRewardModel`: any Hugging Face sequence-classification model with a scalar head,
  trained by trl's RewardTrainer (backend/reward_training.py); minutes per fit on CPU.
Both have their own tokenizer, so PPO calls them on decoded text, never on the policy's token ids.
`load_reward_model` reads either tier back from a version directory.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from backend.models import atomic_directory
from backend.store import Store, text_key

HELD_OUT_FRACTION = 0.2
# L2 strengths tried at each full refit, chosen on a held-out split of the training prompts. Per pair,
# so the penalty fades as pairs accumulate (like logistic regression's C): l2 = L2_PER_PAIR[i] / n.
L2_PER_PAIR = (0.05, 0.15, 0.5, 1.5, 5.0)
DEFAULT_L2_PER_PAIR = 0.5
FINETUNE_MAX_CHARS = 1500  # of question + response: keeps every pair under MiniLM's 512 positions


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected - margin), averaged: the pairwise loss of InstructGPT and trl."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def ranking_confidence(scores: list[float]) -> float:
    """How sure the model is of its own ordering: mean P(better) over adjacent pairs of the sorted scores."""
    ordered = sorted(scores, reverse=True)
    if len(ordered) < 2:
        return 1.0
    gaps = torch.tensor([a - b for a, b in zip(ordered, ordered[1:])])
    return float(torch.sigmoid(gaps).mean())


def is_held_out(prompt: str, salt: str = "") -> bool:
    """Split by prompt, never by pair: pairs of one prompt share text, so a pair split leaks accuracy.

    A different `salt` gives an independent split (e.g. inside the training prompts, to tune the head).
    """
    return zlib.crc32((salt + prompt).encode()) % 100 < HELD_OUT_FRACTION * 100


def last_human_turn(prompt: str) -> str:
    """The question the response answers: the text after the last "Human:" of an HH-style dialogue.

    A plain prompt (no "Human:" marker, as in Label Studio tasks) is returned stripped. Embedding the
    last turn instead of the whole dialogue keeps the request inside MiniLM's 256-token window.
    """
    start = prompt.rfind("Human:")
    turn = prompt[start + len("Human:"):] if start >= 0 else prompt
    return turn.rsplit("\n\nAssistant:", 1)[0].strip()


class TextEncoder:
    """Mean-pooled, L2-normalised embeddings of a frozen encoder, cached per text in the store."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, store: Store | None):
        self.model, self.tokenizer, self.name, self.store = model, tokenizer, name, store
        self.dim = int(model.config.hidden_size)

    @torch.no_grad()
    def _embed_uncached(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                 max_length=256, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)
            out.append(F.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D) float32 embeddings; texts seen before by any process come from the store."""
        keys = [text_key(self.name, t) for t in texts]
        cached = self.store.get_embeddings(list(set(keys))) if self.store else {}
        # embed in length order: batches of similar length waste little on padding (5x faster on HH data)
        missing = sorted({t for t, k in zip(texts, keys) if k not in cached}, key=len)
        if missing:
            fresh = self._embed_uncached(missing)
            new = {text_key(self.name, t): v.astype(np.float32).tobytes() for t, v in zip(missing, fresh)}
            if self.store:
                self.store.put_embeddings(new)
            cached = {**cached, **new}
        return np.stack([np.frombuffer(cached[k], dtype=np.float32) for k in keys]) if texts else np.zeros((0, self.dim), np.float32)


def num_features(dim: int) -> int:
    """Length of `pair_features` rows for an encoder of width `dim`."""
    return 2 * dim + 2


def pair_features(question_emb: np.ndarray, response_emb: np.ndarray, responses: list[str]) -> torch.Tensor:
    """(N, 2D+2) features: the response, its interaction with the question, their cosine, its log length.

    Measured on HH-harmless (bench/reward_learning.py): the question-response terms add about 2 points
    over the response alone; the log length is kept but the model is checked against prefer-shorter.
    """
    cosine = (question_emb * response_emb).sum(1, keepdims=True)  # (N, 1), embeddings are unit-norm
    log_len = np.log1p([len(r) for r in responses]).astype(np.float32)[:, None]  # (N, 1)
    return torch.from_numpy(np.concatenate([response_emb, question_emb * response_emb, cosine, log_len], axis=1))


@dataclass
class FitResult:
    weights: torch.Tensor  # (F,)
    train_accuracy: float
    held_out_accuracy: float | None
    train_pairs: int
    held_out_pairs: int
    l2_per_pair: float = DEFAULT_L2_PER_PAIR


def fit_head(diff_train: torch.Tensor, margin: torch.Tensor, l2: float = 1e-3,
             init: torch.Tensor | None = None, max_iter: int = 100) -> torch.Tensor:
    """Weights w minimising Bradley-Terry loss of w·(f_chosen - f_rejected) + l2·|w|², by full-batch L-BFGS."""
    w = (init.clone() if init is not None else torch.zeros(diff_train.shape[1])).requires_grad_(True)
    optimiser = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        r = diff_train @ w
        loss = bradley_terry_loss(r, torch.zeros_like(r), margin) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach()


def choose_l2_per_pair(diffs: torch.Tensor, margin: torch.Tensor, prompts: list[str]) -> float:
    """The L2_PER_PAIR value with the lowest held-out Bradley-Terry loss on a split of these (training) prompts."""
    inner = torch.tensor([is_held_out(p, salt="tune") for p in prompts], dtype=torch.bool)
    if inner.sum() < 10 or (~inner).sum() < 10:  # too few pairs to tell strengths apart
        return DEFAULT_L2_PER_PAIR
    n = int((~inner).sum())
    losses = {}
    for per_pair in L2_PER_PAIR:
        w = fit_head(diffs[~inner], margin[~inner], l2=per_pair / n)
        r = diffs[inner] @ w
        losses[per_pair] = float(bradley_terry_loss(r, torch.zeros_like(r), margin[inner]))
    return min(losses, key=losses.get)


def refit_head(model: "RewardModel", diffs: torch.Tensor, margin: torch.Tensor, prompts: list[str]) -> "RewardModel":
    """A head fitted from scratch on every given pair, its L2 tuned on a split of these prompts."""
    per_pair = choose_l2_per_pair(diffs, margin, prompts)
    weights = fit_head(diffs, margin, l2=per_pair / max(1, len(prompts)))
    return model.with_weights(weights, l2_per_pair=per_pair)


class RewardModel:
    """The frozen encoder plus a Bradley-Terry head: score(prompts, responses) -> list of floats."""

    tier = "head"

    def __init__(self, encoder: TextEncoder, weights: torch.Tensor | None = None, version: int | None = None,
                 l2_per_pair: float = DEFAULT_L2_PER_PAIR):
        expected = num_features(encoder.dim)
        if weights is not None and weights.shape != (expected,):
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit encoder {encoder.name!r}: "
                             f"expected ({expected},) = num_features({encoder.dim}); refit the head")
        self.encoder = encoder
        self.weights = weights if weights is not None else torch.zeros(expected)
        self.version = version
        self.l2_per_pair = l2_per_pair

    def features(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        questions = self.encoder.embed([last_human_turn(p) for p in prompts])
        return pair_features(questions, self.encoder.embed(responses), responses)

    def pair_diffs(self, prompts: list[str], chosen: list[str], rejected: list[str]) -> torch.Tensor:
        """(N, F) f(prompt, chosen) - f(prompt, rejected): what the head's margin is linear in."""
        return self.features(prompts, chosen) - self.features(prompts, rejected)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not responses:
            return []
        return (self.features(prompts, responses) @ self.weights).tolist()

    def fit(self, prompts: list[str], chosen: list[str], rejected: list[str], margins: list[float]) -> FitResult:
        """Refit the head on every training pair, L2 tuned on a split of the training prompts;
        measure it on held-out prompts (`is_held_out`)."""
        diffs = self.pair_diffs(prompts, chosen, rejected)  # (N, F)
        margin = torch.tensor(margins, dtype=torch.float32)
        held = torch.tensor([is_held_out(p) for p in prompts], dtype=torch.bool)
        train = ~held if (~held).any() else torch.ones_like(held)
        fitted = refit_head(self, diffs[train], margin[train], [p for p, t in zip(prompts, train.tolist()) if t])
        weights, per_pair = fitted.weights, fitted.l2_per_pair
        accuracy = lambda mask: float(((diffs[mask] @ weights) > 0).float().mean())  # noqa: E731
        return FitResult(
            weights=weights,
            train_accuracy=accuracy(train),
            held_out_accuracy=accuracy(held) if held.any() else None,
            train_pairs=int(train.sum()),
            held_out_pairs=int(held.sum()),
            l2_per_pair=per_pair,
        )

    def with_weights(self, weights: torch.Tensor, version: int | None = None,
                     l2_per_pair: float | None = None) -> "RewardModel":
        """A new model on the same encoder: fitting never mutates the model being served."""
        return RewardModel(self.encoder, weights, version,
                           self.l2_per_pair if l2_per_pair is None else l2_per_pair)

    def save(self, directory: Path) -> None:
        """Write the head atomically: a crash mid-write never leaves a broken version directory."""
        meta = {"tier": self.tier, "encoder": self.encoder.name, "dim": self.encoder.dim,
                "l2_per_pair": self.l2_per_pair}
        with atomic_directory(directory) as staging:
            torch.save(self.weights, staging / "head.pt")
            (staging / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, encoder: TextEncoder, version: int | None = None) -> "RewardModel":
        meta = json.loads((directory / "meta.json").read_text())
        if meta["encoder"] != encoder.name:
            raise ValueError(
                f"reward model {directory} was fitted on encoder {meta['encoder']!r}, but REWARD_MODEL={encoder.name!r}: "
                "set REWARD_MODEL back, or refit"
            )
        return cls(encoder, torch.load(directory / "head.pt"), version=version,
                   l2_per_pair=meta.get("l2_per_pair", DEFAULT_L2_PER_PAIR))


def finetune_text(prompt: str, response: str) -> str:
    """What the fine-tuned tier reads: the question, a separator line, the response, clipped in characters."""
    question = last_human_turn(prompt)[-FINETUNE_MAX_CHARS // 3:]
    return f"{question}\n\n{response}"[:FINETUNE_MAX_CHARS]


class FineTunedRewardModel:
    """A sequence-classification model with one output (e.g. MiniLM fine-tuned by trl's RewardTrainer)."""

    tier = "finetune"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, version: int | None = None,
                 batch_size: int = 16):
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model needs num_labels=1, got {model.config.num_labels}: "
                             "load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)")
        self.model, self.tokenizer, self.version, self.batch_size = model.eval(), tokenizer, version, batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [finetune_text(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=512, return_tensors="pt")
            out += self.model(**enc).logits[:, 0].tolist()  # (B,)
        return out

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            (staging / "meta.json").write_text(json.dumps({"tier": self.tier}))

    @classmethod
    def load(cls, directory: Path, version: int | None = None) -> "FineTunedRewardModel":
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, dtype=torch.float32)
        return cls(model, tokenizer, version)


def load_reward_model(directory: Path, encoder: TextEncoder, version: int | None = None):
    """Either tier from a version directory, as its meta.json says (heads saved before tiers existed are heads)."""
    tier = json.loads((directory / "meta.json").read_text()).get("tier", "head")
    if tier == "head":
        return RewardModel.load(directory, encoder, version)
    if tier == "finetune":
        return FineTunedRewardModel.load(directory, version)
    raise ValueError(f"reward model {directory} has unknown tier {tier!r}: expected 'head' or 'finetune'")


