"""Model registry: the store's published versions in, loaded models out, once per process per version.

Every process (web workers and the training worker) asks the store which version is newest
on each use (one indexed query) and loads a model only when that version changes, so no
process serves a stale model and none loads a model per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from backend.models import load_causal_lm, load_encoder, resolve_encoder, resolve_policy
from backend.reward import RewardModel, TextEncoder, load_reward_model
from backend.settings import Settings
from backend.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedPolicy:
    version: int
    path: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


class ModelRegistry:
    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._encoder: TextEncoder | None = None
        self._reward: RewardModel | None = None
        self._policy: LoadedPolicy | None = None

    # --- versions, straight from the store ---
    def policy_version(self) -> int:
        latest = self.store.latest_version("policy")
        return latest.version if latest else 0

    def reward_version(self) -> int:
        latest = self.store.latest_version("reward")
        return latest.version if latest else 0

    def model_version(self) -> str:
        """What /setup and every prediction report; it changes whenever either model is published."""
        return f"policy-v{self.policy_version()}.reward-v{self.reward_version()}"

    def policy_dir(self, version: int) -> Path:
        return self.settings.model_dir / "policy" / f"v{version:04d}"

    def reward_dir(self, version: int) -> Path:
        return self.settings.model_dir / "reward" / f"v{version:04d}"

    # --- loaded models ---
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            path = resolve_encoder(self.settings.reward_model)
            model, tokenizer = load_encoder(path)
            self._encoder = TextEncoder(model, tokenizer, name=self.settings.reward_model, store=self.store)
        return self._encoder

    def reward_model(self) -> RewardModel:
        """The newest published reward model; version 0 (all-zero head) before any pair arrived."""
        latest = self.store.latest_version("reward")
        if latest is None:
            if self._reward is None or self._reward.version is not None:
                self._reward = RewardModel(self.encoder(), version=None)
            return self._reward
        if self._reward is None or self._reward.version != latest.version:
            self._reward = load_reward_model(Path(latest.path), self.encoder(), version=latest.version)
        return self._reward

    def policy(self) -> LoadedPolicy:
        """The newest published policy; the first call publishes the base model as version 0."""
        latest = self.store.latest_version("policy")
        if latest is None:
            base = resolve_policy(self.settings.policy_model, self.settings.model_dir)
            self.store.publish_version("policy", 0, base, pairs_seen=0, metrics={"base": self.settings.policy_model})
            latest = self.store.latest_version("policy")
        if self._policy is None or self._policy.version != latest.version:
            log.info("loading policy v%d from %s", latest.version, latest.path)
            model, tokenizer = load_causal_lm(latest.path)
            self._policy = LoadedPolicy(latest.version, latest.path, model, tokenizer)
        return self._policy
