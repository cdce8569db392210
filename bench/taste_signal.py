"""How many tasks a taste needs before its reward model can be trusted: the signal curve of every suite taste.

In:  the default policy's candidates (the settings a user gets) for the suite's 108 training questions (the 36
     of bench/suite.py and the 72 of its --more-questions), sampled under each seed as bench/suite.py samples
     them, so 108 tasks a seed; the base answers to the 24 held-out questions of every seed (as bench/suite.py
     samples them); every taste of bench/preference_suite.py, annotated with its own template.
Out: per taste and task count (the suite's 36 first, then the rest in order), the pairs the annotator's
     verdicts give, and the default reward model fitted on them, judged as the guard rails judge it: its
     agreement with the taste on every pair of held-out answers the taste separates, and the lower 95% Wilson
     bound that gates the trigger and the publication (PPO_MIN_RM_ACCURACY, 0.5).
No policy update: this asks whether the signal is there before an update can use it, at the cost of sampling
(16 minutes for three seeds on this 2-core CPU, 1 thread, beside two suite runs; then about a minute).
Run: `.venv/bin/python bench/taste_signal.py` (docs/policy.md has the table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ppo_loop import (  # noqa: E402
    MORE_NUMERIC, MORE_OPEN, annotate, fit_reward, machine, reward_check, sample, split_prompts)
from preference_suite import SUITE  # noqa: E402
from suite import user_knobs  # noqa: E402

from backend.generation import sample_completions  # noqa: E402
from backend.models import (  # noqa: E402
    DEFAULT_ENCODER, DEFAULT_POLICY, load_causal_lm, load_encoder, resolve_encoder, resolve_policy)
from backend.reward import TextEncoder  # noqa: E402
from backend.reward_training import wilson_interval  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.store import Store  # noqa: E402

TASK_COUNTS = (36, 72, 108, 216, 324)


def sample_tasks(seeds: list[int], cache: Path) -> dict:
    """Every seed's candidates for the 108 training questions and base answers to the held-out ones (cached)."""
    if cache.exists():
        return json.loads(cache.read_text())
    base, tokenizer = load_causal_lm(resolve_policy(DEFAULT_POLICY, ROOT / ".cache"))
    tasks: dict = {"prompts": [], "candidates": [], "held_out": []}
    for seed in seeds:
        knobs = user_knobs("ppo", seed)
        train, held_out = split_prompts(knobs.held_out)
        questions = train + MORE_NUMERIC + MORE_OPEN
        torch.manual_seed(seed)  # the suite's own candidates for its 36 questions, then the 72 more
        tasks["prompts"] += questions
        tasks["candidates"] += sample_completions(base, tokenizer, questions, knobs.candidates,
                                                  knobs.candidate_tokens)
        torch.manual_seed(seed + 1000)
        eval_prompts, answers, _ = sample(base, tokenizer, held_out, knobs.eval_samples, knobs.candidate_tokens)
        tasks["held_out"].append({"prompts": eval_prompts, "answers": answers})
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(tasks))
    return tasks


def signal_curve(tasks: dict, taste, encoder: TextEncoder, counts: list[int]) -> list[dict]:
    """The pairs and the reward model's held-out check after the first n tasks, for each n of `counts`."""
    rows = []
    for n in counts:
        prompts, chosen, rejected = annotate(tasks["prompts"][:n], tasks["candidates"][:n], taste.score,
                                             taste.verdict)
        right = judged = 0
        if prompts:
            reward = fit_reward(encoder, prompts, chosen, rejected)
            for held in tasks["held_out"]:  # one answer set a seed, each judged on its own prompts
                r, j, _ = reward_check(reward, held["prompts"], [held["answers"]], taste.score)
                right, judged = right + r, judged + j
        low = wilson_interval(right, judged)[0] if judged else None
        rows.append({"taste": taste.name, "tasks": n, "pairs": len(prompts), "agreeing": right, "judged": judged,
                     "accuracy_low": low})
    return rows


def has_signal(row: dict, trigger_pairs: int, min_accuracy: float) -> bool:
    """The trigger would fire and the reward model is shown better than chance."""
    return row["pairs"] >= trigger_pairs and row["accuracy_low"] is not None and row["accuracy_low"] >= min_accuracy


def signal_from(curve: list[dict], trigger_pairs: int, min_accuracy: float) -> int | None:
    """The smallest task count from which every larger count of one taste's curve has the signal (None: never):
    a count that has it only to lose it again is noise, not signal."""
    return next((r["tasks"] for i, r in enumerate(curve)
                 if all(has_signal(s, trigger_pairs, min_accuracy) for s in curve[i:])), None)


def markdown(rows: list[dict], counts: list[int], trigger_pairs: int, min_accuracy: float) -> str:
    head = "| taste (template) | " + " | ".join(f"{n} tasks" for n in counts) + " | signal from |"
    out = [head, "|" + "---|" * (len(counts) + 2)]
    for name, taste in SUITE.items():
        mine = [r for r in rows if r["taste"] == name]
        cells = [f"{r['pairs']} pairs, {r['agreeing']}/{r['judged']} "
                 f"({'-' if r['accuracy_low'] is None else format(r['accuracy_low'], '.2f')})" for r in mine]
        since = signal_from(mine, trigger_pairs, min_accuracy)
        since_cell = since or f"not by {counts[-1]}"
        out.append(f"| {name} ({taste.verdict}) | " + " | ".join(cells) + f" | {since_cell} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "taste_signal_tasks.json",
                        help="the sampled tasks; delete it to sample again")
    parser.add_argument("--embeddings", type=Path, default=ROOT / ".cache" / "taste_signal_embeddings.sqlite3",
                        help="the encoder's cache of the answers' embeddings")
    parser.add_argument("--json", type=Path, help="write the rows here (JSON lines)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tasks = sample_tasks(args.seeds, args.cache)
    counts = [n for n in TASK_COUNTS if n <= len(tasks["prompts"])]
    store = Store(f"sqlite:///{args.embeddings.resolve()}")  # each text embedded once, not once a fit
    store.create_schema()
    encoder = TextEncoder(*load_encoder(resolve_encoder(DEFAULT_ENCODER)), DEFAULT_ENCODER, store=store)
    defaults = Settings()
    trigger_pairs, min_accuracy = defaults.ppo_trigger_pairs, defaults.ppo_min_rm_accuracy
    rows = [row for taste in SUITE.values() for row in signal_curve(tasks, taste, encoder, counts)]
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"Pairs, then the reward model's agreeing/judged held-out pairs (lower 95% bound); 'signal from': the "
          f"task count from which the trigger ({trigger_pairs} pairs) fires and the bound is at least "
          f"{min_accuracy}.\n")
    print(markdown(rows, counts, trigger_pairs, min_accuracy))
    print(f"\nMachine: {machine()}. Seeds {args.seeds}. {(time.perf_counter() - started) / 60:.1f} min.")


if __name__ == "__main__":
    main()
