"""Model registry: a project's published versions in, its loaded models out, once per process per version.

Every connected Label Studio project has its own lineage of reward models and policies (its pairs,
its versions, its `model_version`). Every process asks the store which version of a project is
newest on each use (one indexed query) and loads a model only when it has not loaded that version's
files yet, so no process serves a stale model and none loads a model per request. Loaded models are
kept by path in a small LRU: projects that serve the same files (every project starts on the base
policy) share one copy in memory, and many projects do not exhaust it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from sqlalchemy.exc import IntegrityError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from backend.generation import Generator, VLLMGenerator, generation_dtype, transformers_generator
from backend.models import load_causal_lm, load_encoder, resolve_encoder, resolve_policy
from backend.reward import RewardModel, TextEncoder, load_reward_model
from backend.settings import Settings
from backend.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class LoadedPolicy:
    version: int
    path: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


class LoadedModels(Generic[T]):
    """Models by the path they were loaded from, at most `capacity`, the least recently used dropped."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._models: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()  # a threaded web server may ask from two requests at once

    def get(self, path: str, load: Callable[[], T]) -> T:
        with self._lock:
            if path in self._models:
                self._models.move_to_end(path)
                return self._models[path]
            model = load()
            self._models[path] = model
            while len(self._models) > self.capacity:
                dropped, _ = self._models.popitem(last=False)
                log.info("unloaded %s (more than %d loaded)", dropped, self.capacity)
            return model


def transformers_engine(settings: Settings, policy: LoadedPolicy) -> Generator:
    dtype = generation_dtype(settings.generation_dtype, policy.model.device)
    return transformers_generator(policy.model, policy.tokenizer, settings.generation_batch_size, dtype)


def vllm_engine(settings: Settings, policy: LoadedPolicy) -> Generator:
    return VLLMGenerator(policy.path, policy.tokenizer, seed=settings.seed)


# GENERATION_ENGINE -> how a loaded policy becomes a generator of candidates
ENGINES: dict[str, Callable[[Settings, LoadedPolicy], Generator]] = {
    "transformers": transformers_engine, "vllm": vllm_engine}


class ModelRegistry:
    def __init__(self, settings: Settings, store: Store,
                 engines: dict[str, Callable[[Settings, LoadedPolicy], Generator]] | None = None):
        self.settings, self.store = settings, store
        self.engines = ENGINES if engines is None else engines
        self._encoder: TextEncoder | None = None
        self._rewards: LoadedModels[RewardModel] = LoadedModels(settings.max_loaded_policies)
        self._policies: LoadedModels[LoadedPolicy] = LoadedModels(settings.max_loaded_policies)
        # an engine holds its own copy of the weights (vLLM's on the GPU): one per published version in use
        self._generators: LoadedModels[Generator] = LoadedModels(settings.max_loaded_policies)

    # --- versions, straight from the store ---
    def policy_version(self, project_id: int) -> int:
        latest = self.store.latest_version("policy", project_id)
        return latest.version if latest else 0

    def reward_version(self, project_id: int) -> int:
        latest = self.store.latest_version("reward", project_id)
        return latest.version if latest else 0

    def model_version(self, project_id: int) -> str:
        """What /setup and every prediction of the project report; it changes whenever either of its models is."""
        return f"policy-v{self.policy_version(project_id)}.reward-v{self.reward_version(project_id)}"

    def policy_dir(self, project_id: int, version: int) -> Path:
        return self.settings.model_dir / "projects" / str(project_id) / "policy" / f"v{version:04d}"

    def reward_dir(self, project_id: int, version: int) -> Path:
        return self.settings.model_dir / "projects" / str(project_id) / "reward" / f"v{version:04d}"

    # --- loaded models ---
    def encoder(self) -> TextEncoder:
        """The frozen encoder under every project's reward heads: loaded once, shared."""
        if self._encoder is None:
            path = resolve_encoder(self.settings.reward_model)
            model, tokenizer = load_encoder(path)
            self._encoder = TextEncoder(model, tokenizer, name=self.settings.reward_model, store=self.store)
        return self._encoder

    def reward_model(self, project_id: int) -> RewardModel:
        """The project's newest published reward model; the untrained all-zero head (version None) before
        its first pair."""
        latest = self.store.latest_version("reward", project_id)
        if latest is None:
            return self._rewards.get("", lambda: RewardModel(self.encoder(), version=None))
        return self._rewards.get(latest.path, lambda: load_reward_model(Path(latest.path), self.encoder(),
                                                                        version=latest.version))

    def policy(self, project_id: int) -> LoadedPolicy:
        """The project's newest published policy; the first call publishes the base model as its version 0."""
        latest = self.store.latest_version("policy", project_id)
        if latest is None:
            base = resolve_policy(self.settings.policy_model, self.settings.model_dir)
            try:
                self.store.publish_version("policy", project_id, 0, base, pairs_seen=0,
                                           metrics={"base": self.settings.policy_model})
            except IntegrityError:  # another process published the project's v0 first: the same files
                pass
            latest = self.store.latest_version("policy", project_id)

        def load() -> LoadedPolicy:
            log.info("loading policy v%d of project %d from %s", latest.version, project_id, latest.path)
            model, tokenizer = load_causal_lm(latest.path)
            return LoadedPolicy(latest.version, latest.path, model, tokenizer)

        loaded = self._policies.get(latest.path, load)
        # two projects may serve the same files under different version numbers
        return loaded if loaded.version == latest.version else LoadedPolicy(latest.version, latest.path,
                                                                            loaded.model, loaded.tokenizer)

    def generator(self, policy: LoadedPolicy) -> Generator:
        """The GENERATION_ENGINE's generator of this policy version; a newly published version gets a new one."""
        engine = self.engines[self.settings.generation_engine]
        return self._generators.get(policy.path, lambda: engine(self.settings, policy))
