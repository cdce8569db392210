"""Which two of K candidates a pairwise annotator should see: does a taste-agnostic choice separate more?

In:  the default policy's candidates for the suite's 36 training questions (4 x 48 tokens, seeded as in
     bench/suite.py) and every taste of bench/preference_suite.py.
Out: per taste and choice, the questions (of 36, per seed) whose two shown candidates the taste tells apart:
     the pairs one pairwise click yields. "any pair" is the ceiling: some two of the K differ.

The pairwise template shows two candidates; a sparse taste (warm_tone) tells apart only 7-13 of the first
two per seed. This asks whether choosing the two most different candidates, by words or by length, finds more
without knowing the taste (docs/policy.md has the table). Run: `.venv/bin/python bench/pair_choice.py`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ppo_loop import split_prompts  # noqa: E402
from preference_suite import SUITE  # noqa: E402
from suite import user_knobs  # noqa: E402

from backend.generation import sample_completions  # noqa: E402
from backend.models import DEFAULT_POLICY, load_causal_lm, resolve_policy  # noqa: E402


def word_distance(a: str, b: str) -> float:
    """1 - Jaccard similarity of the two answers' word sets."""
    x, y = (set(re.findall(r"[a-z']+", t.lower())) for t in (a, b))
    return 1 - len(x & y) / max(1, len(x | y))


def most_apart(candidates: list[str], distance) -> tuple[int, int]:
    """The two candidates farthest apart by `distance` (the first such pair on a tie)."""
    return max(itertools.combinations(range(len(candidates)), 2),
               key=lambda p: distance(candidates[p[0]], candidates[p[1]]))


CHOICES = {
    "first two": lambda c: (0, 1),
    "most different words": lambda c: most_apart(c, word_distance),
    "most different length": lambda c: most_apart(c, lambda a, b: abs(len(a) - len(b))),
}


def separated(candidates: list[list[str]], score, choose) -> int:
    """Questions whose chosen two candidates the taste scores differently (`choose=None`: any two)."""
    count = 0
    for bodies in candidates:
        scores = [score(b) for b in bodies]
        if choose is None:
            count += len(set(scores)) > 1
        else:
            i, j = choose(bodies)
            count += scores[i] != scores[j]
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, tokenizer = load_causal_lm(resolve_policy(DEFAULT_POLICY, ROOT / ".cache"))
    table: dict[str, dict[str, list[int]]] = {}
    for seed in args.seeds:
        knobs = user_knobs("ppo", seed)
        train_prompts, _ = split_prompts(knobs.held_out)
        torch.manual_seed(seed)  # the suite's candidates for this seed
        candidates = sample_completions(base, tokenizer, train_prompts, knobs.candidates, knobs.candidate_tokens)
        for name, taste in SUITE.items():
            for choice, choose in [*CHOICES.items(), ("any pair", None)]:
                table.setdefault(name, {}).setdefault(choice, []).append(separated(candidates, taste.score, choose))
    print(f"| taste | {' | '.join([*CHOICES, 'any pair'])} |\n|---|" + "---|" * (len(CHOICES) + 1))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{', '.join(map(str, v))} ({sum(v)})" for v in row.values()) + " |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
