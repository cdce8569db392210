"""How well and how fast the default reward model learns from human rankings, against simple baselines.

In: shared/data/hh_harmless_dev.jsonl (1,000 HH-harmless pairs, one prompt each). Out: markdown tables.
Split by prompt into 4 folds: every pair is held out once, scored by models trained on the other ~750.
One 4-fold split of 1,000 pairs is itself noisy (different splits moved accuracies by 2-3 points), so
the split is repeated with `--repeats` different seeds; a pair's correctness is averaged over the
repeats, and 95% intervals come from a bootstrap over pairs (paired, for differences between methods).
The learning curve (incremental updates vs refits from scratch) runs on the first split.
Embeddings are cached in a SQLite store (default .cache/reward_bench.sqlite3): the first run embeds
~4,000 texts with MiniLM (about 1.5 minutes on 2 cores), later runs read them back. The last table
times `rlhf-backend reward fit` on all 1,000 pairs with an empty cache, as a user would run it.

    .venv/bin/python bench/reward_learning.py [--cache PATH] [--chunk 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.models import DEFAULT_ENCODER, load_encoder, resolve_encoder  # noqa: E402
from backend.reward import LinearHead, RewardModel, TextEncoder, refit  # noqa: E402
from backend.reward_training import UpdatePolicy, read_pairs, pair_margins, update_head  # noqa: E402
from backend.store import Store  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
FOLDS = 4
CHECKPOINTS = (10, 50, 100, 200, 400, 600)
NAMES = {
    "shorter": "prefer the shorter answer (no training)",
    "tfidf": "baseline: TF-IDF char 2-5-grams + logistic regression",
    "emb": "baseline: frozen MiniLM response embeddings + logistic regression",
    "head_emb": "ablation: the default RM's embedding head (final layer, question x response) alone",
    "head_middle": "ablation: the default RM's middle-layer head alone",
    "head_ngram": "ablation: the default RM's n-gram head alone",
    "head_structure": "ablation: the default RM's structure head (counts of sentences, lines, words...) alone",
    "no_structure": "ablation: the default RM without its structure head (the default until this version)",
    "rm_inc": "default RM, incremental (chunks of 10, replay 256, full refit every 10 updates)",
    "rm": "**default RM (sum of the four heads), one refit on the training pairs**",
}
HEADS = ("embedding", "middle", "ngrams", "structure")


def without(model: RewardModel, *heads: str) -> RewardModel:
    """`model` with these heads removed (the embedding head zeroed: the model always has one).

    Each head is fitted on its own, so the rest is the model fitted without them, up to its scale,
    which leaves accuracy (the sign of the margin) unchanged."""
    removed = {head: None for head in heads if head != "embedding"}
    if "embedding" in heads:
        removed["embedding"] = LinearHead(np.zeros_like(model.embedding.weights), 0.0)
    return model.replace(**removed)


def logistic_on_differences(train_diff, test_diff, C: float = 1.0) -> np.ndarray:
    """Margins of an intercept-free logistic regression on f(chosen) - f(rejected), both orientations."""
    x = train_diff.tocsr() if sparse.issparse(train_diff) else train_diff
    stacked = sparse.vstack([x, -x]) if sparse.issparse(x) else np.vstack([x, -x])
    y = np.r_[np.ones(x.shape[0]), np.zeros(x.shape[0])]
    clf = LogisticRegression(C=C, fit_intercept=False, max_iter=3000).fit(stacked, y)
    return np.asarray(test_diff @ clf.coef_.ravel()).ravel()


def bootstrap(values: np.ndarray, rng: np.random.Generator, n: int = 4000) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-pair values."""
    boots = values[rng.integers(0, len(values), size=(n, len(values)))].mean(1)
    return float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def split(prompts: list[str], repeat: int) -> np.ndarray:
    """Fold of each pair, by prompt; repeat 0 is the split earlier versions of this bench used."""
    salt = "" if repeat == 0 else f"repeat{repeat}:"
    return np.array([zlib.crc32((salt + p).encode()) % FOLDS for p in prompts])


def baselines(pairs, tr: np.ndarray, te: np.ndarray, response_diffs: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Held-out margins of the three baselines for one fold; `response_diffs` is (N, D) MiniLM embeddings
    of the chosen minus the rejected responses."""
    n = len(pairs)
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    len_c = np.array([len(p.chosen) for p in pairs])
    len_r = np.array([len(p.rejected) for p in pairs])
    coin = np.random.default_rng(seed).choice([-1.0, 1.0], size=len(te))  # equal lengths: a coin flip
    shorter = np.where(len_c[te] == len_r[te], coin, np.sign(len_r[te] - len_c[te]))
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    vectorizer.fit([texts[i] for i in tr] + [texts[n + i] for i in tr])
    x = vectorizer.transform(texts)
    d = (x[:n] - x[n:]).tocsr()
    return {"shorter": shorter, "tfidf": logistic_on_differences(d[tr], d[te]),
            "emb": logistic_on_differences(response_diffs[tr], response_diffs[te])}


def fit_on(untrained: RewardModel, pairs) -> RewardModel:
    return refit(untrained, [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                 np.array([p.margin for p in pairs]))


def learning_curve(untrained: RewardModel, pairs, tr: np.ndarray, te: np.ndarray, chunk: int, seed: int, curve, times):
    """Pairs arrive in chunks in a random order; the serving model is updated incrementally after each
    chunk, and at checkpoints compared with a refit from scratch on the same pairs. Returns its last margins."""
    order = list(tr)
    random.Random(seed).shuffle(order)
    held = [pairs[i] for i in te]
    serving, book = untrained, {"last": -1, "trained": 0, "since_full": 0}
    for end in range(chunk, len(order) + 1, chunk):
        # a pair's id is its arrival position, as the store's ids are
        seen = [type(pairs[i])(j, pairs[i].prompt, pairs[i].chosen, pairs[i].rejected) for j, i in enumerate(order[:end])]
        mark = time.perf_counter()
        candidate, full = update_head(serving, seen, book["last"], book["trained"], book["since_full"],
                                      UpdatePolicy(), random.Random(end))
        times["full" if full else "incremental"].append(time.perf_counter() - mark)
        candidate.version = end
        serving, book = candidate, {"last": end - 1, "trained": end, "since_full": 0 if full else book["since_full"] + 1}
        last = end + chunk > len(order)
        if end in CHECKPOINTS or last:
            mark = time.perf_counter()
            scratch = fit_on(untrained, seen)
            times["scratch"].append(time.perf_counter() - mark)
            key = "all" if last else end
            curve["refit"].setdefault(key, []).append(pair_margins(scratch, held) > 0)
            curve["incremental"].setdefault(key, []).append(pair_margins(serving, held) > 0)
    return pair_margins(serving, held)


def time_cold_fit(threads: int) -> tuple[float, float]:
    """(seconds, peak GB) of `rlhf-backend reward fit` on all pairs in a fresh process with an empty cache."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "MODEL_DIR": scratch, "TORCH_THREADS": str(threads)}
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "rlhf-backend"), "reward", "fit", "--pairs", str(DATA),
                        "--out", f"{scratch}/rm", "--cache", f"{scratch}/cache.sqlite3"],
                       env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - started
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "reward_bench.sqlite3")
    parser.add_argument("--chunk", type=int, default=10, help="pairs per incremental update")
    parser.add_argument("--repeats", type=int, default=5, help="4-fold splits, each with another seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-cold-fit", action="store_true", help="do not time `reward fit` with an empty cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{args.cache.resolve()}")
    store.create_schema()
    model, tokenizer = load_encoder(resolve_encoder(DEFAULT_ENCODER))
    encoder = TextEncoder(model, tokenizer, DEFAULT_ENCODER, store)
    untrained = RewardModel(encoder)

    pairs = read_pairs(DATA)
    prompts = [p.prompt for p in pairs]
    n = len(pairs)
    response_diffs = encoder.embed([p.chosen for p in pairs]) - encoder.embed([p.rejected for p in pairs])  # (N, D)
    correct = {key: np.zeros((args.repeats, n)) for key in NAMES if key != "rm_inc"}
    correct_inc = np.zeros(n)
    curve = {"refit": {}, "incremental": {}}
    times = {"incremental": [], "full": [], "scratch": [], "fold_refit": []}
    for repeat in range(args.repeats):
        fold = split(prompts, repeat)
        for k in range(FOLDS):
            tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            held = [pairs[i] for i in te]
            margins = baselines(pairs, tr, te, response_diffs, seed=repeat * FOLDS + k)
            mark = time.perf_counter()
            fitted = fit_on(untrained, [pairs[i] for i in tr])
            times["fold_refit"].append(time.perf_counter() - mark)
            margins["rm"] = pair_margins(fitted, held)
            for key, head in (("head_emb", "embedding"), ("head_middle", "middle"), ("head_ngram", "ngrams"),
                              ("head_structure", "structure")):
                margins[key] = pair_margins(without(fitted, *(h for h in HEADS if h != head)), held)
            margins["no_structure"] = pair_margins(without(fitted, "structure"), held)
            for key, m in margins.items():
                correct[key][repeat, te] = m > 0
            if repeat == 0:
                correct_inc[te] = learning_curve(untrained, pairs, tr, te, args.chunk, k, curve, times) > 0
            print(f"split {repeat + 1}/{args.repeats}, fold {k + 1}/{FOLDS} done", file=sys.stderr, flush=True)

    rng = np.random.default_rng(0)
    mean = {key: c.mean(0) for key, c in correct.items()}  # per pair: share of repeats it was right
    mean["rm_inc"] = correct_inc
    per_split = {key: [f"{c[r].mean():.3f}" for r in range(args.repeats)] for key, c in correct.items()}
    print(f"## Reward models on HH-harmless dev ({n} pairs, {FOLDS}-fold split by prompt x {args.repeats} splits, "
          f"~{n * 3 // 4} training pairs a fold)\n")
    print("| method | held-out accuracy (mean of splits) | 95% interval | per split | "
          "default RM minus this method [95% paired bootstrap] |")
    print("|---|---|---|---|---|")
    for key, name in NAMES.items():
        low, high = bootstrap(mean[key], rng)
        splits = ", ".join(per_split.get(key, [f"{correct_inc.mean():.3f} (split 1 only)"]))
        if key == "rm":
            versus = ""
        else:
            d = mean["rm"] - mean[key] if key != "rm_inc" else correct["rm"][0] - correct_inc
            d_low, d_high = bootstrap(d, rng)
            versus = f"{d.mean():+.3f} [{d_low:+.3f}, {d_high:+.3f}]"
        print(f"| {name} | {mean[key].mean():.3f} | {low:.3f}-{high:.3f} | {splits} | {versus} |")
    agree = np.mean(correct["rm"] == correct["shorter"])
    print(f"\nThe default RM agrees with prefer-shorter on {agree:.2f} of pairs (a length shortcut would push "
          "this towards 1).\n")

    print(f"## Learning curve: held-out accuracy vs training pairs seen (split 1; pairs arrive in chunks of {args.chunk})\n")
    print("| pairs seen | incremental | refit from scratch |")
    print("|---|---|---|")
    for c in list(CHECKPOINTS) + ["all"]:
        if curve["refit"].get(c):
            inc, ref = np.concatenate(curve["incremental"][c]), np.concatenate(curve["refit"][c])
            print(f"| {c if c != 'all' else f'all (~{n * 3 // 4})'} | {inc.mean():.3f} | {ref.mean():.3f} |")

    ms = lambda xs: f"{1000 * statistics.median(xs):.0f} ms"  # noqa: E731
    print("\n## Wall time per update (median; embeddings cached)\n")
    print("| update | median | count |")
    print("|---|---|---|")
    print(f"| incremental (new + replay, warm-started L-BFGS, every head) | {ms(times['incremental'])} | {len(times['incremental'])} |")
    print(f"| scheduled full refit inside the incremental run (L2 tuned per head) | {ms(times['full'])} | {len(times['full'])} |")
    print(f"| refit from scratch on the pairs seen (L2 tuned per head) | {ms(times['scratch'])} | {len(times['scratch'])} |")
    print(f"| refit on all ~{n * 3 // 4} training pairs of a fold | {ms(times['fold_refit'])} | {len(times['fold_refit'])} |")
    if not args.skip_cold_fit:
        seconds, peak = time_cold_fit(args.threads)
        print(f"\n`rlhf-backend reward fit` on all {n} pairs, empty embedding cache, fresh process: "
              f"**{seconds:.0f} s** (goal: 120 s), peak RSS {peak:.1f} GB.")
    print(f"\nMachine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
