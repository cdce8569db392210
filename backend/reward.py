"""Reward model: (prompt, response) texts in, a scalar score out; preference pairs in, a new head out.

The default tier is a frozen sentence encoder (MiniLM) whose mean-pooled embeddings are cached
per text in the store, plus a linear Bradley-Terry head over features of the prompt and the
response. Fitting the head on cached embeddings takes milliseconds, so the reward model can
follow the annotators within seconds of each ranking. It has its own tokenizer, so PPO calls
it on decoded text (`RewardModel.score`), never on the policy's token ids.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from backend.store import Store, text_key

HELD_OUT_FRACTION = 0.2


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


def is_held_out(prompt: str) -> bool:
    """Split by prompt, never by pair: pairs of one prompt share text, so a pair split leaks accuracy."""
    return zlib.crc32(prompt.encode()) % 100 < HELD_OUT_FRACTION * 100


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
        missing = sorted({t for t, k in zip(texts, keys) if k not in cached})
        if missing:
            fresh = self._embed_uncached(missing)
            new = {text_key(self.name, t): v.astype(np.float32).tobytes() for t, v in zip(missing, fresh)}
            if self.store:
                self.store.put_embeddings(new)
            cached = {**cached, **new}
        return np.stack([np.frombuffer(cached[k], dtype=np.float32) for k in keys]) if texts else np.zeros((0, self.dim), np.float32)


def pair_features(prompt_emb: np.ndarray, response_emb: np.ndarray, responses: list[str]) -> torch.Tensor:
    """(N, 2D+1) features: the response, its interaction with the prompt, and its log length."""
    log_len = np.log1p([len(r) for r in responses]).astype(np.float32)[:, None] / 8.0
    return torch.from_numpy(np.concatenate([response_emb, prompt_emb * response_emb, log_len], axis=1))


@dataclass
class FitResult:
    weights: torch.Tensor  # (F,)
    train_accuracy: float
    held_out_accuracy: float | None
    train_pairs: int
    held_out_pairs: int


def fit_head(diff_train: torch.Tensor, margin: torch.Tensor, l2: float = 1e-3,
             init: torch.Tensor | None = None, max_iter: int = 100) -> torch.Tensor:
    """Weights w minimising Bradley-Terry loss of w·(f_chosen - f_rejected), by full-batch L-BFGS."""
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


class RewardModel:
    """The frozen encoder plus a Bradley-Terry head: score(prompts, responses) -> list of floats."""

    def __init__(self, encoder: TextEncoder, weights: torch.Tensor | None = None, version: int | None = None):
        self.encoder = encoder
        self.weights = weights if weights is not None else torch.zeros(2 * encoder.dim + 1)
        self.version = version

    def features(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return pair_features(self.encoder.embed(prompts), self.encoder.embed(responses), responses)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not responses:
            return []
        return (self.features(prompts, responses) @ self.weights).tolist()

    def fit(self, prompts: list[str], chosen: list[str], rejected: list[str], margins: list[float]) -> FitResult:
        """Refit the head on every pair (warm-started from the current head); measure it on held-out prompts."""
        diffs = self.features(prompts, chosen) - self.features(prompts, rejected)  # (N, F)
        margin = torch.tensor(margins, dtype=torch.float32)
        held = torch.tensor([is_held_out(p) for p in prompts], dtype=torch.bool)
        train = ~held if (~held).any() else torch.ones_like(held)
        weights = fit_head(diffs[train], margin[train], init=self.weights)
        accuracy = lambda mask: float(((diffs[mask] @ weights) > 0).float().mean())  # noqa: E731
        return FitResult(
            weights=weights,
            train_accuracy=accuracy(train),
            held_out_accuracy=accuracy(held) if held.any() else None,
            train_pairs=int(train.sum()),
            held_out_pairs=int(held.sum()),
        )

    def save(self, directory: Path) -> None:
        """Write the head atomically: a crash mid-write never leaves a broken version directory."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
        torch.save(self.weights, staging / "head.pt")
        (staging / "meta.json").write_text(json.dumps({"encoder": self.encoder.name, "dim": self.encoder.dim}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)

    @classmethod
    def load(cls, directory: Path, encoder: TextEncoder, version: int | None = None) -> "RewardModel":
        meta = json.loads((directory / "meta.json").read_text())
        if meta["encoder"] != encoder.name:
            raise ValueError(
                f"reward model {directory} was fitted on encoder {meta['encoder']!r}, but REWARD_MODEL={encoder.name!r}: "
                "set REWARD_MODEL back, or refit"
            )
        return cls(encoder, torch.load(directory / "head.pt"), version=version)
