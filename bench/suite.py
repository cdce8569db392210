"""The whole preference suite x seeds x algorithms, with the settings a user gets out of the box.

In:  the real default models, bench/preference_suite.py's tastes, seeds and algorithms.
Out: a markdown table, one row per (taste, seed, algorithm): win-rate against the base policy by
     the taste's own score (W/L/T, sign-test p), NLL rise under the base policy, KL, answer length,
     whether the guard rails would publish it, minutes and peak memory; then per algorithm the
     mean win-rate, the worst taste and how many tastes pass the bar (p < 0.05 and NLL rise <= 0.5
     in at least 2 seeds of 3). Optionally the rows as JSON (--json), appended as each run ends.

Per seed the base policy writes NUM_CANDIDATES x MAX_NEW_TOKENS candidates (the defaults: 4 x 48)
for the 36 training questions of bench/ppo_loop.py (108 with --more-questions), and 4 answers to each of its 24 held-out
questions; every taste ranks the same candidates in its own verdict format. The policy update runs
with the backend's defaults (backend/worker.py's ppo_config and dpo_config of `Settings()`).

Run: `.venv/bin/python bench/suite.py --algorithms dpo ppo --seeds 0 1 2` (docs/policy.md has the
minutes each run took on 2 cores). `--set ppo_stop_kl=8` judges a candidate default the same way.
`--report docs/suite-seed*.jsonl` prints the tables of rows stored before, without running anything.
`--rounds 2` runs the loop the automatic trigger gives a user instead of one update on every pair: two batches
of rankings, each followed by an update of the serving policy under the guard rails; the served policy is judged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ppo_loop import MORE_NUMERIC, MORE_OPEN, Knobs, machine, run_experiment, run_loop, sample, split_prompts  # noqa: E402
from preference_suite import SUITE  # noqa: E402

from backend.evaluation import REWARD_GAIN_Z, paired_prompt_difference, should_publish, sign_test_p_value  # noqa: E402
from backend.generation import sample_completions  # noqa: E402
from backend.models import DEFAULT_ENCODER, DEFAULT_POLICY, load_causal_lm, load_encoder, resolve_encoder, resolve_policy  # noqa: E402
from backend.reward import TextEncoder  # noqa: E402
from backend.rl import ALGORITHMS  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.worker import dpo_config, ppo_config  # noqa: E402

log = logging.getLogger("suite")
MAX_NLL_RISE = 0.5  # the bar of issue 15, nats/token


def user_knobs(algorithm: str, seed: int, overrides: dict[str, str] | None = None) -> Knobs:
    """The out-of-the-box settings, or those with `overrides` (a candidate default), as bench/ppo_loop.py's knobs."""
    defaults = Settings(**{**(overrides or {}), "seed": seed})
    ppo = ppo_config(defaults)
    return Knobs(candidates=defaults.num_candidates, candidate_tokens=defaults.max_new_tokens,
                 held_out=24, algorithm=algorithm, group_size=defaults.rl_group_size,
                 trigger_pairs=defaults.ppo_trigger_pairs, ppo=ppo, dpo=dpo_config(defaults))


def setting_override(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: give SETTING=VALUE, e.g. ppo_stop_kl=8")
    return name, value


def passes(row: dict) -> bool:
    return row["wins"] > row["losses"] and row["p_value"] < 0.05 and \
        row["nll_new_answers"] - row["nll_base_answers"] <= MAX_NLL_RISE


def table(rows: list[dict]) -> str:
    head = ("| taste (verdict) | seed | algorithm | pairs | win-rate (W/L/T) | p | NLL rise | KL | chars base -> new | "
            "RM acc. (pairs, low) | publish | min | peak RSS |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['preference']} ({SUITE[r['preference']].verdict}) | {r['seed']} | {r['algorithm']} | "
                   f"{r['pairs']} | {r['win_rate']:.3f} ({r['wins']}/{r['losses']}/{r['ties']}) | {r['p_value']:.2g} | "
                   f"{r['nll_new_answers'] - r['nll_base_answers']:+.2f} | {r['held_out_kl']:.2f} | "
                   f"{r['chars_base']:.0f} -> {r['chars_new']:.0f} | {rm_accuracy(r)} | {'yes' if r['published'] else 'no'} | "
                   f"{r['seconds'] / 60:.1f} | {r['peak_rss_gb']:.1f} GB |")
    return "\n".join(out)


def rm_accuracy(row: dict) -> str:
    low = row.get("rm_held_out_accuracy_low")
    bound = "" if low is None else f", {low:.2f}"
    return f"{row['rm_held_out_accuracy']:.2f} ({row.get('rm_held_out_pairs', '?')}{bound})"


def served_win_rate(row: dict) -> float:
    """What annotators get: the new policy's win-rate if the guard rails publish it, else the serving
    (base) policy's own 0.5."""
    return row["win_rate"] if row["published"] else 0.5


def summary(rows: list[dict]) -> str:
    out = ["| algorithm | runs | mean win-rate | worst taste (mean win-rate) | tastes passing in >= 2 of their seeds | "
           "runs passing | published | published non-gains | withheld gains | mean served win-rate |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        mine = [r for r in rows if r["algorithm"] == algorithm]
        by_taste: dict[str, list[dict]] = {}
        for r in mine:
            by_taste.setdefault(r["preference"], []).append(r)
        means = {t: sum(r["win_rate"] for r in rs) / len(rs) for t, rs in by_taste.items()}
        worst = min(means, key=means.get)
        passing = sum(sum(map(passes, rs)) >= min(2, len(rs)) for rs in by_taste.values())
        out.append(f"| {algorithm} | {len(mine)} | {sum(r['win_rate'] for r in mine) / len(mine):.3f} | "
                   f"{worst} ({means[worst]:.3f}) | {passing} of {len(by_taste)} | {sum(map(passes, mine))} of "
                   f"{len(mine)} | {sum(r['published'] for r in mine)} of {len(mine)} | "
                   f"{sum(r['published'] and not passes(r) for r in mine)} | "
                   f"{sum(passes(r) and not r['published'] for r in mine)} | "
                   f"{sum(map(served_win_rate, mine)) / len(mine):.3f} |")
    return "\n".join(out)


def reward_gain_shown(new: list[float], base: list[float]) -> bool:
    """Today's reward rule: the mean held-out reward rose by more than REWARD_GAIN_Z standard errors."""
    gain, se = paired_prompt_difference(new, base, Knobs().eval_samples)
    return gain - REWARD_GAIN_Z * se > 0


def reward_model_prefers_new_answers(new: list[float], base: list[float]) -> bool:
    """The reward model scores the new answer above the base answer of the same pair significantly
    more often than the other way round (sign test, one-sided 5%): scale-free, so one long answer's
    large score cannot carry it."""
    wins, losses = sum(n > b for n, b in zip(new, base)), sum(n < b for n, b in zip(new, base))
    return sign_test_p_value(wins, losses) < 0.05


def reward_model_prefers_new_prompts(new: list[float], base: list[float]) -> bool:
    """As above, over prompts (a prompt's mean new score against its mean base score): the pairs of one
    prompt share its difficulty, so prompts are the independent units."""
    k = Knobs().eval_samples
    diffs = [sum(new[i:i + k]) - sum(base[i:i + k]) for i in range(0, len(new), k)]
    return sign_test_p_value(sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)) < 0.05


PUBLISH_RULES = {
    "reward gain > 1.64 SE (today's)": reward_gain_shown,
    "RM prefers new answers (sign test over pairs)": reward_model_prefers_new_answers,
    "RM prefers new answers (sign test over prompts)": reward_model_prefers_new_prompts,
}


def publish_rule_table(rows: list[dict]) -> str:
    """Each candidate reward rule on rows that recorded their per-pair scores, beside the guard rails'
    other checks as the backend applies them: KL, fluency (rows from before the bench recorded the rise's
    standard error are held to its point estimate) and the reward model's accuracy bound."""
    out = ["| publish rule | runs | published | published non-gains | of which losses | withheld gains | "
           "mean served win-rate |", "|---|---|---|---|---|---|---|"]
    defaults = Settings()
    # the guard rails with their reward check switched off: every gain clears a minimum of minus infinity
    others = [should_publish(r["held_out_kl"], defaults.ppo_max_kl, 0.0, 0.0, min_reward_gain=-math.inf,
                             rm_accuracy_low=r["rm_held_out_accuracy_low"],
                             min_rm_accuracy=defaults.ppo_min_rm_accuracy,
                             nll_rise=r["nll_new_answers"] - r["nll_base_answers"],
                             max_nll_rise=defaults.ppo_max_nll_rise, nll_rise_se=r.get("nll_rise_se", 0.0))[0]
              for r in rows]
    for name, rule in PUBLISH_RULES.items():
        decided = [{**r, "published": ok and rule(r["rm_scores_new"], r["rm_scores_base"])}
                   for r, ok in zip(rows, others)]
        published = [r for r in decided if r["published"]]
        out.append(f"| {name} | {len(decided)} | {len(published)} | {sum(not passes(r) for r in published)} | "
                   f"{sum(r['win_rate'] < 0.5 for r in published)} | "
                   f"{sum(passes(r) and not r['published'] for r in decided)} | "
                   f"{sum(map(served_win_rate, decided)) / len(decided):.3f} |")
    return "\n".join(out)


def report(paths: list[Path]) -> str:
    """The row table and the summary of stored rows, one summary per distinct `--set` (the defaults: {}).

    Rows from before `--set` existed record no settings; they were made under the defaults of their day,
    which may not be today's, so they get a summary of their own."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    by_settings: dict[str, list[dict]] = {}
    for r in rows:
        ranked = {"ranked_questions": r["ranked_questions"]} if "ranked_questions" in r else {}
        looped = {"rounds": len(r["rounds"])} if "rounds" in r else {}
        key = (json.dumps({**r["settings"], **ranked, **looped}, sort_keys=True) if "settings" in r
               else "not recorded (the defaults of their day)")
        by_settings.setdefault(key, []).append(r)
    parts = [f"settings {key}:\n\n" + table(rs) + "\n\n" + summary(rs) for key, rs in by_settings.items()]
    # rows since the per-pair scores were recorded: the publish rules side by side (not a loop's rows: each of
    # its updates was judged against the policy serving then, not against the base policy)
    recorded = [r for r in rows if r.get("rm_scores_new") and "rounds" not in r]
    if recorded:
        parts.append(f"publish rules on the {len(recorded)} runs that recorded per-pair scores:\n\n"
                     + publish_rule_table(recorded))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["dpo", "ppo"], choices=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tastes", nargs="+", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="append each run's row here (JSON lines)")
    parser.add_argument("--max-kl", type=float, default=Settings().ppo_max_kl)
    parser.add_argument("--more-questions", action="store_true",
                        help="train on 108 questions instead of 36 (same held-out ones): 3x the rankings per seed")
    parser.add_argument("--ranked-questions", type=int, metavar="N",
                        help="the annotator ranks only N of the training questions (a seeded sample; the update "
                             "still trains on all): the signal a run needs, for PPO_TRIGGER_PAIRS")
    parser.add_argument("--rounds", type=int, metavar="R",
                        help="the automatic trigger's loop: the annotator ranks the questions in R batches, each "
                             "followed by an update of the serving policy under the guard rails; the last serving "
                             "policy is judged (bench/ppo_loop.py's run_loop)")
    parser.add_argument("--set", nargs="+", default=[], metavar="SETTING=VALUE", type=setting_override,
                        help="judge a candidate default on the suite, e.g. --set ppo_stop_kl=8 (Settings' field names)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="ROWS.jsonl",
                        help="print the tables of these stored rows (from --json) and run nothing")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    if args.rounds is not None and args.ranked_questions is not None:
        parser.error("--rounds and --ranked-questions: give one (the loop ranks every question, a batch a round)")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more (one update after each batch of questions)")
    overrides = dict(args.set)
    try:  # a wrong name or value fails here, before any sampling
        Settings(**overrides)
    except ValidationError as e:
        parser.error("--set: " + "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in e.errors())
                     + " (the names are Settings' fields, as in backend/settings.py)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tokenizer = load_causal_lm(resolve_policy(DEFAULT_POLICY, ROOT / ".cache"))
    encoder = TextEncoder(*load_encoder(resolve_encoder(DEFAULT_ENCODER)), DEFAULT_ENCODER, store=None)
    rows = []
    for seed in args.seeds:
        knobs = user_knobs(args.algorithms[0], seed, overrides)
        train_prompts, held_out = split_prompts(knobs.held_out)
        train_prompts += MORE_NUMERIC + MORE_OPEN if args.more_questions else []
        torch.manual_seed(seed)  # candidates and base answers differ per seed, as a new project's would
        candidates = sample_completions(base, tokenizer, train_prompts, knobs.candidates, knobs.candidate_tokens)
        torch.manual_seed(seed + 1000)
        eval_prompts, base_answers, _ = sample(base, tokenizer, held_out, knobs.eval_samples, knobs.candidate_tokens)
        for name in args.tastes:  # every algorithm on a taste before the next taste: a cut-short run still compares
            taste = SUITE[name]
            for algorithm in args.algorithms:
                knobs = user_knobs(algorithm, seed, overrides)
                knobs = replace(knobs, annotation=taste.verdict, ranked_questions=args.ranked_questions)
                experiment = (run_experiment(name, taste.score, base, tokenizer, encoder, train_prompts, candidates,
                                             eval_prompts, base_answers, knobs, args.max_kl)
                              if args.rounds is None else
                              run_loop(name, taste.score, base, tokenizer, encoder, train_prompts, candidates,
                                       eval_prompts, base_answers, knobs, args.max_kl, args.rounds))
                row = {**asdict(experiment), "seed": seed, "settings": overrides}
                if not row["rounds"]:
                    del row["rounds"]  # one update, as every row before --rounds
                if args.ranked_questions is not None:
                    row["ranked_questions"] = args.ranked_questions
                rows.append(row)
                log.info("%s seed %d %s: win %.3f p %.2g NLL %+.2f published %s", name, seed, algorithm,
                         row["win_rate"], row["p_value"], row["nll_new_answers"] - row["nll_base_answers"],
                         row["published"])
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"## The preference suite: {len(args.tastes)} tastes x seeds {args.seeds} x {args.algorithms}, "
          f"{overrides or 'out-of-the-box'} settings, 24 held-out questions x {Knobs().eval_samples} answers\n")
    print(table(rows) + "\n\n" + summary(rows))
    print(f"\nMachine: {machine()}. Total {(time.perf_counter() - started) / 60:.0f} min.")


if __name__ == "__main__":
    main()
