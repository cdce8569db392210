"""bench/suite.py's command line and its report of stored rows (no model runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import suite  # noqa: E402


def row(preference: str, seed: int, wins: int, losses: int, p_value: float, published: bool,
        settings: dict | None = None) -> dict:
    total = wins + losses + 4
    return {"preference": preference, "seed": seed, "algorithm": "ppo", "pairs": 40, "wins": wins, "losses": losses,
            "ties": 4, "win_rate": (wins + 2) / total, "p_value": p_value, "nll_base_answers": 2.0,
            "nll_new_answers": 1.8, "held_out_kl": 3.0, "chars_base": 180.0, "chars_new": 150.0,
            "rm_held_out_accuracy": 0.9, "rm_held_out_pairs": 30, "rm_held_out_accuracy_low": 0.75,
            "published": published, "seconds": 600.0, "peak_rss_gb": 3.2, "settings": settings or {}}


def test_report_summarises_each_candidate_default_apart_from_the_defaults(tmp_path):
    kl8 = {"ppo_stop_kl": "8"}
    rows = [row("shorter", 0, 30, 5, 1e-5, True), row("shorter", 1, 8, 9, 0.6, True),  # a published non-gain
            row("shorter", 0, 31, 4, 1e-6, True, kl8), row("shorter", 1, 29, 6, 1e-4, False, kl8)]  # a withheld gain
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    defaults, candidate = suite.report([path]).split('settings {"ppo_stop_kl": "8"}')

    # the columns: runs passing, published, published non-gains, withheld gains
    assert "| ppo | 2 |" in defaults and "| 1 of 2 | 2 of 2 | 1 | 0 |" in defaults
    assert "| ppo | 2 |" in candidate and "| 2 of 2 | 1 of 2 | 0 | 1 |" in candidate


def test_report_keeps_rows_that_recorded_no_settings_apart_from_todays_defaults(tmp_path):
    old = row("shorter", 0, 30, 5, 1e-5, True)
    del old["settings"]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps(row("shorter", 0, 8, 9, 0.6, True)) + "\n")

    text = suite.report([path])

    assert "settings {}:" in text and "settings not recorded" in text and text.count("| ppo | 1 |") == 2


def test_set_with_an_unknown_setting_is_a_usage_error_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--set", "ppo_stop_kll=8"])
    assert exit_.value.code == 2
    assert "ppo_stop_kll" in capsys.readouterr().err


def test_report_puts_a_large_but_rare_reward_gain_through_the_mean_rule_and_not_through_the_sign_tests(tmp_path):
    # 24 held-out prompts x 4 answers: the reward model scores the new answers 3 higher on 14 prompts and
    # 1 lower on 10; the mean rises beyond 1.64 standard errors, but 14 of 24 prompts is no majority shown
    base = [0.0] * 96
    new = [3.0] * 56 + [-1.0] * 40
    tie = {**row("addresses_reader", 0, 9, 8, 0.5, True), "rm_scores_new": new, "rm_scores_base": base}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(tie) + "\n")

    rules = suite.report([path]).split("publish rules on the 1 runs")[1]

    # runs, published, published non-gains, of which losses, withheld gains
    assert "| reward gain > 1.64 SE (today's) | 1 | 1 | 1 | 0 | 0 |" in rules
    assert "| RM prefers new answers (sign test over pairs) | 1 | 0 | 0 | 0 | 0 |" in rules
    assert "| RM prefers new answers (sign test over prompts) | 1 | 0 | 0 | 0 | 0 |" in rules


def test_report_publishes_under_no_rule_a_gain_whose_answers_are_not_shown_fluent(tmp_path):
    # every new answer scores higher, but their NLL rose 0.40 +- 0.10: 0.40 + 1.64 x 0.10 > PPO_MAX_NLL_RISE 0.5
    drifted = {**row("warm_tone", 0, 30, 5, 1e-5, True), "nll_new_answers": 2.4, "nll_rise_se": 0.1,
               "rm_scores_new": [1.0 + i % 3 for i in range(96)], "rm_scores_base": [0.0] * 96}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(drifted) + "\n")

    rules = suite.report([path]).split("publish rules on the 1 runs")[1]

    assert rules.count("| 1 | 0 | 0 | 0 | 1 |") == len(suite.PUBLISH_RULES)  # each rule withholds this gain
    assert "| 1 | 1 |" not in rules


@pytest.mark.parametrize("regime, key", [({"ranked_questions": 12}, '{"ranked_questions": 12}'),
                                         ({"rounds": [{"round": 1}, {"round": 2}]}, '{"rounds": 2}')])
def test_report_keeps_runs_on_fewer_ranked_questions_or_in_rounds_apart_from_one_update_on_all(tmp_path, regime, key):
    other = {**row("shorter", 0, 8, 9, 0.6, False), **regime}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row("shorter", 0, 30, 5, 1e-5, True)) + "\n" + json.dumps(other) + "\n")

    text = suite.report([path])

    assert f"settings {key}:" in text and "settings {}:" in text and text.count("| ppo | 1 |") == 2


def test_the_annotator_ranks_a_seeded_sample_of_the_questions_or_all_of_them():
    from ppo_loop import ranked_sample

    sample = ranked_sample(36, 12, seed=0)
    assert len(set(sample)) == 12 and all(0 <= i < 36 for i in sample) and sample == sorted(sample)
    assert sample == ranked_sample(36, 12, seed=0) != ranked_sample(36, 12, seed=1)
    assert ranked_sample(36, None, seed=0) == ranked_sample(36, 40, seed=0) == list(range(36))


def test_the_loop_ranks_every_question_once_in_seeded_batches_of_nearly_equal_size():
    from ppo_loop import loop_batches

    batches = loop_batches(36, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(36)) and [len(b) for b in batches] == [18, 18]
    assert batches == loop_batches(36, 2, seed=0) != loop_batches(36, 2, seed=1)
    assert [len(b) for b in loop_batches(10, 3, seed=0)] == [3, 3, 4]
    with pytest.raises(ValueError, match="rounds=0 is invalid"):
        loop_batches(36, 0, seed=0)


def test_rounds_with_ranked_questions_is_a_usage_error_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--rounds", "2", "--ranked-questions", "12"])
    assert "give one" in capsys.readouterr().err


def test_a_tastes_signal_counts_from_where_it_holds_at_every_larger_task_count():
    import taste_signal

    def point(tasks, pairs, low):
        return {"tasks": tasks, "pairs": pairs, "accuracy_low": low}

    curve = [point(36, 12, 0.55), point(72, 25, 0.52), point(108, 40, 0.45), point(216, 80, 0.58),
             point(324, 120, 0.61)]
    assert taste_signal.signal_from(curve, 20, 0.5) == 216  # 72 had it and lost it at 108: noise
    assert taste_signal.signal_from(curve, 100, 0.5) == 324  # the trigger needs pairs too
    assert taste_signal.signal_from([point(36, 30, None), point(72, 60, 0.4)], 20, 0.5) is None
