"""The model registry on tiny models: each project's newest versions, loaded once, shared by path, bounded."""

from __future__ import annotations

from backend.registry import ModelRegistry
from backend.settings import load_settings
from backend.store import Store


def make_registry(tiny_env: dict, **overrides) -> ModelRegistry:
    settings = load_settings({**tiny_env, **{k.upper(): str(v) for k, v in overrides.items()}})
    store = Store(settings.store_url)
    store.create_schema()
    return ModelRegistry(settings, store)


def test_projects_on_the_base_policy_share_one_loaded_copy(tiny_env):
    registry = make_registry(tiny_env)
    first, second = registry.policy(1), registry.policy(2)
    assert first.version == second.version == 0 and first.model is second.model
    assert [v.project_id for v in registry.store.versions("policy", 1)] == [1]  # each project its own v0 row


def test_a_projects_new_policy_is_loaded_for_it_alone_and_loads_stay_bounded(tiny_env, tmp_path):
    registry = make_registry(tiny_env, max_loaded_policies=1)
    base = registry.policy(1)
    base.model.save_pretrained(tmp_path / "p1")
    base.tokenizer.save_pretrained(tmp_path / "p1")
    registry.store.publish_version("policy", 1, 1, str(tmp_path / "p1"), pairs_seen=0, metrics={})
    mine = registry.policy(1)
    assert mine.version == 1 and mine.model is not base.model
    assert registry.policy(2).version == 0
    # one policy fits: project 2's base evicted project 1's copy, which is loaded again when asked for
    assert registry.policy(1).model is not mine.model


def test_model_version_names_each_projects_own_versions(tiny_env):
    registry = make_registry(tiny_env)
    registry.store.publish_version("reward", 7, 1, "/r1", pairs_seen=3, metrics={})
    assert registry.model_version(7) == "policy-v0.reward-v1" and registry.model_version(8) == "policy-v0.reward-v0"


def test_a_staging_directory_left_by_a_killed_writer_goes_at_the_next_publish(tmp_path):
    import os
    import time

    from backend.models import ABANDONED_STAGING_SECONDS, atomic_directory

    abandoned, live = tmp_path / ".v0003-dead", tmp_path / ".v0004-busy"
    abandoned.mkdir()
    live.mkdir()
    old = time.time() - ABANDONED_STAGING_SECONDS - 60
    os.utime(abandoned, (old, old))
    with atomic_directory(tmp_path / "v0005") as staging:
        (staging / "config.json").write_text("{}")
    assert not abandoned.exists() and live.exists()  # a recent one may still be written to
    assert (tmp_path / "v0005" / "config.json").exists()


def test_two_processes_converting_the_base_policy_at_once_keep_the_first_copy_in_place(tmp_path):
    from backend.models import atomic_directory

    target = tmp_path / "base"
    with atomic_directory(target, keep_existing=True) as late:  # started first, finishes last
        with atomic_directory(target, keep_existing=True) as early:
            (early / "config.json").write_text("early")
        loading = (target / "config.json").stat().st_ino  # another process is reading this copy now
        (late / "config.json").write_text("late")
    assert (target / "config.json").read_text() == "early"
    assert (target / "config.json").stat().st_ino == loading
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # the loser's staging directory is gone
    with atomic_directory(target) as version:  # a model version, rewritten by a retried job, is replaced
        (version / "config.json").write_text("retried")
    assert (target / "config.json").read_text() == "retried"


def test_the_configured_engine_generates_for_each_published_version_one_engine_each(tiny_env, tmp_path):
    settings = load_settings({**tiny_env, "GENERATION_ENGINE": "vllm"})
    store = Store(settings.store_url)
    store.create_schema()
    built = []

    def fake_vllm(settings, policy):  # stands in for vLLM on a machine without a GPU
        built.append(policy.path)
        return f"engine for v{policy.version}"

    registry = ModelRegistry(settings, store, engines={"transformers": None, "vllm": fake_vllm})
    base = registry.policy(1)
    assert registry.generator(base) == "engine for v0" and registry.generator(registry.policy(1)) == "engine for v0"
    base.model.save_pretrained(tmp_path / "p1")
    base.tokenizer.save_pretrained(tmp_path / "p1")
    store.publish_version("policy", 1, 1, str(tmp_path / "p1"), pairs_seen=0, metrics={})
    assert registry.generator(registry.policy(1)) == "engine for v1"  # a new version: a new engine
    assert built == [base.path, str(tmp_path / "p1")]
