import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backend.ledger import AnnotationSaved
from backend.preferences import PreferencePair
from backend.reward import FineTunedRewardModel, LinearHead, RewardModel, is_held_out, load_reward_model, num_features
from backend.reward_cli import reward_app
from backend.reward_training import (
    PairRecord,
    UpdatePolicy,
    expected_calibration_error,
    finetune_reward_model,
    fit_reward_version,
    read_pairs,
    rollback_reward,
    should_publish,
    update_head,
    wilson_interval,
)
from backend.store import Store

GOOD, BAD = "the answer is {i} days in a week", "I am sorry, I cannot help with that."


def records(start: int, n: int, flip: bool = False) -> list[PairRecord]:
    rows = [PairRecord(i, f"question {i}?", GOOD.format(i=i), BAD) for i in range(start, start + n)]
    return [PairRecord(p.id, p.prompt, p.rejected, p.chosen) for p in rows] if flip else rows


def add_pairs(store: Store, rows: list[PairRecord], annotation_id: int) -> None:
    pairs = tuple(PreferencePair(project_id=1, task_id=r.id, annotator=1, prompt=r.prompt, chosen=r.chosen,
                                 rejected=r.rejected, margin=0.0, chosen_policy_version=0, rejected_policy_version=0)
                  for r in rows)
    store.apply_annotation_event(AnnotationSaved(annotation_id, 1, 0, None, pairs))


def test_wilson_interval_holds_the_proportion_and_narrows_with_more_pairs():
    low, high = wilson_interval(60, 100)
    low_big, high_big = wilson_interval(600, 1000)
    assert low < 0.6 < high and (high_big - low_big) < (high - low)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_expected_calibration_error_is_large_for_confident_coin_flips_and_small_for_honest_ones():
    confident = np.array([8.0, -8.0] * 50)  # p = 0.9997, half right
    honest = np.array([0.01, -0.01] * 50)  # p = 0.5025, half right
    assert expected_calibration_error(confident) > 0.45
    assert expected_calibration_error(honest) < 0.01


def test_publish_gate_refuses_a_candidate_worse_beyond_noise_and_accepts_a_tie():
    serving = np.ones(100)
    assert should_publish(np.r_[-np.ones(30), np.ones(70)], serving)[0] is False
    assert should_publish(np.r_[-np.ones(2), np.ones(98)], serving)[0] is True
    noisy = np.r_[np.ones(50), -np.ones(50)]
    assert should_publish(noisy[::-1].copy(), noisy)[0] is True  # 50 won, 50 lost: no evidence either way


def test_incremental_update_moves_the_serving_head_on_new_pairs_plus_replay(encoder):
    serving = RewardModel(encoder, version=1)  # the embedding head starts at zero
    train = records(0, 30) + records(30, 10)
    new, full = update_head(serving, train, last_pair_id=29, trained_pairs=30, updates_since_full=0,
                            policy=UpdatePolicy(replay_pairs=5), rng=random.Random(0))
    assert full is False
    assert new.embedding.weights.any() and not serving.embedding.weights.any()  # the serving model is untouched


def test_update_refits_fully_every_n_updates_and_after_deletions(encoder):
    serving = RewardModel(encoder, version=3)
    policy = UpdatePolicy(full_refit_every=4)
    _, scheduled = update_head(serving, records(0, 20), 9, 10, 3, policy, random.Random(0))
    _, after_delete = update_head(serving, records(2, 18), 9, 10, 0, policy, random.Random(0))
    _, regular = update_head(serving, records(0, 20), 9, 10, 0, policy, random.Random(0))
    assert (scheduled, after_delete, regular) == (True, True, False)


def test_first_fit_publishes_a_version_with_held_out_accuracy_and_calibration(store, encoder, tmp_path):
    add_pairs(store, records(0, 60), annotation_id=1)
    update = fit_reward_version(store, 1, RewardModel(encoder), lambda v: tmp_path / f"v{v}", UpdatePolicy())
    latest = store.latest_version("reward", 1)
    assert update.version == latest.version == 1
    assert latest.metrics["held_out_accuracy"] == 1.0 and latest.metrics["held_out_ece"] is not None
    assert latest.metrics["last_pair_id"] == max(p.id for p in store.pairs())
    assert isinstance(load_reward_model(tmp_path / "v1", encoder), RewardModel)


def test_a_candidate_worse_than_the_serving_model_on_held_out_pairs_is_not_published(store, encoder, tmp_path):
    rows = records(0, 120)
    # training prompts teach the opposite of what the held-out prompts (and the serving head) say
    add_pairs(store, [r if is_held_out(r.prompt) else PairRecord(r.id, r.prompt, r.rejected, r.chosen) for r in rows], 1)
    good = RewardModel(encoder).fit([r.prompt for r in rows], [r.chosen for r in rows], [r.rejected for r in rows],
                                    [0.0] * len(rows))
    serving = good.model.replace(version=1)
    store.publish_version("reward", 1, 1, str(tmp_path / "v1"), pairs_seen=0, metrics={})
    update = fit_reward_version(store, 1, serving, lambda v: tmp_path / f"v{v}", UpdatePolicy())
    assert update.version is None and "worse" in update.reason
    assert store.latest_version("reward", 1).version == 1


def test_rollback_serves_the_old_version_again(store, encoder, tmp_path):
    for version in (1, 2, 3):
        RewardModel(encoder, LinearHead(np.full(num_features(encoder.dim), float(version)), 0.5)).save(
            tmp_path / f"v{version}")
        store.publish_version("reward", 1, version, str(tmp_path / f"v{version}"), pairs_seen=version, metrics={})
    assert rollback_reward(store, 1, 1) == 2
    assert store.latest_version("reward", 1).path == str(tmp_path / "v1")


def test_rollback_to_a_version_whose_files_are_gone_is_refused(store, tmp_path):
    store.publish_version("reward", 1, 1, str(tmp_path / "gone"), pairs_seen=0, metrics={})
    store.publish_version("reward", 1, 2, str(tmp_path / "v2"), pairs_seen=0, metrics={})
    with pytest.raises(ValueError, match="which is gone"):
        rollback_reward(store, 1, 1)
    assert store.latest_version("reward", 1).version == 2


def test_read_pairs_names_the_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "p"}))
    with pytest.raises(ValueError, match="pairs.jsonl:2"):
        read_pairs(path)


def test_cli_fit_then_eval_prints_accuracy_as_the_last_line(tiny_encoder, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
                             for r in records(0, 40)))
    env = {"MODEL_DIR": str(tmp_path / "md"), "REWARD_MODEL": str(tiny_encoder)}
    runner = CliRunner()
    fitted = runner.invoke(reward_app, ["fit", "--pairs", str(pairs), "--out", str(tmp_path / "rm")], env=env)
    assert fitted.exit_code == 0, fitted.output
    evaluated = runner.invoke(reward_app, ["eval", "--model", str(tmp_path / "rm"), "--pairs", str(pairs)], env=env)
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.output.strip().splitlines()[-1] == "accuracy: 1.000"


def test_cli_rollback_of_a_missing_version_exits_2_with_one_line(tmp_path):
    result = CliRunner().invoke(reward_app, ["rollback", "5", "--project", "1"], env={"MODEL_DIR": str(tmp_path / "md")})
    assert result.exit_code == 2 and "project 1 has no reward version 5" in result.output


def test_finetuned_tier_trains_with_reward_trainer_and_loads_back(tiny_encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rows = records(0, 8)
    before = AutoModelForSequenceClassification.from_pretrained(str(tiny_encoder), num_labels=1).state_dict()
    model = finetune_reward_model(str(tiny_encoder), [r.prompt for r in rows], [r.chosen for r in rows],
                                  [r.rejected for r in rows], [0.0] * 8, UpdatePolicy(finetune_epochs=1),
                                  tmp_path / "trainer")
    after = model.model.state_dict()
    changed = [k for k in before if "encoder" in k and not torch.equal(before[k], after[k])]
    assert changed  # LoRA was merged back into the encoder's weights
    model.save(tmp_path / "ft")
    loaded = load_reward_model(tmp_path / "ft", encoder=None)
    assert isinstance(loaded, FineTunedRewardModel)
    assert loaded.score(["q?"], ["an answer"]) == pytest.approx(model.score(["q?"], ["an answer"]), abs=1e-5)
