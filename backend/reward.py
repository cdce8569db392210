"""Reward model: (prompt, response) texts in, a scalar score out; preference pairs in, a new model out.

Two tiers behind one interface (`score(prompts, responses) -> list[float]`, `save(dir)`, `version`):
- `RewardModel`, the default: the sum of four linear Bradley-Terry heads, each over one view of the
  text: a frozen sentence encoder's (MiniLM) final-layer embeddings of the last human turn and the
  response, its middle-layer embeddings of the response (both cached per text in the store),
  TF-IDF character n-grams of the response, and counts of its structure (sentences, lines, words...).
  Fitting them takes milliseconds (incremental) to seconds (full refit), so the reward model follows
  the annotators within seconds of each ranking.
- `FineTunedRewardModel`: any Hugging Face sequence-classification model with a scalar head,
  trained by trl's RewardTrainer (backend/reward_training.py); minutes per fit on CPU.
Both have their own tokenizer, so PPO calls them on decoded text, never on the policy's token ids.
`load_reward_model` reads either tier back from a version directory.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, sparse
from scipy.special import expit
from sklearn.feature_extraction.text import TfidfVectorizer
from threadpoolctl import threadpool_limits
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from backend.models import atomic_directory
from backend.store import Store, text_key

HELD_OUT_FRACTION = 0.2
# L2 strengths tried at each full refit, chosen on a held-out split of the training prompts. Per pair,
# so the penalty fades as pairs accumulate (like logistic regression's C): l2 = L2_PER_PAIR[i] / n.
L2_PER_PAIR = (0.05, 0.15, 0.5, 1.5, 5.0)
DEFAULT_L2_PER_PAIR = 0.5
FINETUNE_MAX_CHARS = 1500  # of question + response: keeps every pair under MiniLM's 512 positions


def ranking_confidence(scores: list[float]) -> float:
    """How sure the model is of its own ordering: mean P(better) over adjacent pairs of the sorted scores."""
    ordered = sorted(scores, reverse=True)
    if len(ordered) < 2:
        return 1.0
    gaps = torch.tensor([a - b for a, b in zip(ordered, ordered[1:])])
    return float(torch.sigmoid(gaps).mean())


def is_held_out(prompt: str, salt: str = "") -> bool:
    """Split by prompt, never by pair: pairs of one prompt share text, so a pair split leaks accuracy.

    A different `salt` gives an independent split (e.g. inside the training prompts, to tune the head).
    """
    return zlib.crc32((salt + prompt).encode()) % 100 < HELD_OUT_FRACTION * 100


def last_human_turn(prompt: str) -> str:
    """The question the response answers: the text after the last "Human:" of an HH-style dialogue.

    A plain prompt (no "Human:" marker, as in Label Studio tasks) is returned stripped. Embedding the
    last turn instead of the whole dialogue keeps the request inside MiniLM's 256-token window.
    """
    start = prompt.rfind("Human:")
    turn = prompt[start + len("Human:"):] if start >= 0 else prompt
    return turn.rsplit("\n\nAssistant:", 1)[0].strip()


class TextEncoder:
    """Mean-pooled, L2-normalised embeddings of a frozen encoder, cached per text in the store.

    Two views of each text come from one forward pass: "final" (the last layer, what sentence
    encoders are trained to output) and "middle" (the layers at a third and two thirds of the depth,
    concatenated), which carry more of the wording: on HH-harmless a head on them alone scored
    0.628 against 0.610 for the final layer (bench/reward_learning.py's ablations).
    """

    VIEWS = ("final", "middle")

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, store: Store | None):
        self.model, self.tokenizer, self.name, self.store = model, tokenizer, name, store
        self.dim = int(model.config.hidden_size)
        depth = int(model.config.num_hidden_layers)
        self.middle_layers = (max(1, round(depth / 3)), max(1, round(2 * depth / 3)))

    def view_dim(self, view: str) -> int:
        return self.dim * (1 if view == "final" else len(self.middle_layers))

    def _key(self, view: str, text: str) -> str:
        return text_key(self.name if view == "final" else f"{self.name}#{view}", text)  # "final" keeps older caches

    @torch.no_grad()
    def _embed_uncached(self, texts: list[str], batch_size: int = 32) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {view: [] for view in self.VIEWS}
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                 max_length=256, return_tensors="pt")
            hidden = self.model(**enc, output_hidden_states=True).hidden_states  # depth + 1 of (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pool = lambda h: F.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)  # noqa: E731
            out["final"].append(pool(hidden[-1]).numpy())
            out["middle"].append(torch.cat([pool(hidden[i]) for i in self.middle_layers], dim=1).numpy())
        return {view: np.concatenate(parts) if parts else np.zeros((0, self.view_dim(view)), np.float32)
                for view, parts in out.items()}

    def embed(self, texts: list[str], view: str = "final") -> np.ndarray:
        """(len(texts), view_dim) float32 embeddings; texts seen before by any process come from the store."""
        return self.embed_views(texts, (view,))[view]

    def embed_views(self, texts: list[str], views: tuple[str, ...] = VIEWS) -> dict[str, np.ndarray]:
        """view -> (len(texts), view_dim) float32 embeddings, read from the store in one query."""
        unknown = [v for v in views if v not in self.VIEWS]
        if unknown:
            raise ValueError(f"views {unknown} are not among {self.VIEWS}")
        keys = {view: [self._key(view, t) for t in texts] for view in views}
        wanted = list({k for view_keys in keys.values() for k in view_keys})
        cached = self.store.get_embeddings(wanted) if self.store else {}
        # embed in length order: batches of similar length waste little on padding (5x faster on HH data)
        missing = sorted({t for view in views for t, k in zip(texts, keys[view]) if k not in cached}, key=len)
        if missing:
            fresh = self._embed_uncached(missing)
            new = {self._key(v, t): fresh[v][i].astype(np.float32).tobytes() for v in self.VIEWS
                   for i, t in enumerate(missing)}  # every view: the others are free now
            if self.store:
                self.store.put_embeddings(new)
            cached = {**cached, **new}
        return {view: np.stack([np.frombuffer(cached[k], dtype=np.float32) for k in keys[view]]) if texts
                else np.zeros((0, self.view_dim(view)), np.float32) for view in views}


def num_features(dim: int) -> int:
    """Length of `pair_features` rows for an encoder of width `dim`."""
    return 2 * dim + 2


def pair_features(question_emb: np.ndarray, response_emb: np.ndarray, responses: list[str]) -> np.ndarray:
    """(N, 2D+2) features: the response, its interaction with the question, their cosine, its log length.

    Measured on HH-harmless (bench/reward_learning.py): the question-response terms add about 2 points
    over the response alone; the log length is kept but the model is checked against prefer-shorter.
    """
    cosine = (question_emb * response_emb).sum(1, keepdims=True)  # (N, 1), embeddings are unit-norm
    log_len = np.log1p([len(r) for r in responses]).astype(np.float32)[:, None]  # (N, 1)
    return np.concatenate([response_emb, question_emb * response_emb, cosine, log_len], axis=1)


# --- fitting a Bradley-Terry head: one solver for the dense (embedding) and the sparse (n-gram) features ---
def fit_bradley_terry(diffs, margin: np.ndarray, l2: float, init: np.ndarray | None = None,
                      max_iter: int = 100) -> np.ndarray:
    """(F,) weights w minimising mean -log sigmoid(diffs·w - margin) + l2·|w|², by L-BFGS.

    `diffs` is f(chosen) - f(rejected), (N, F), a numpy array or a scipy sparse matrix.
    """
    diffs, margin = _as_float64(diffs), np.asarray(margin, dtype=np.float64)
    start = np.zeros(diffs.shape[1]) if init is None else np.asarray(init, dtype=np.float64)
    if diffs.shape[0] == 0:
        return start
    transposed = diffs.T.tocsr() if sparse.issparse(diffs) else diffs.T  # a CSR transpose multiplies 10x faster

    def loss_and_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = diffs @ w - margin  # (N,)
        return float(np.logaddexp(0.0, -z).mean() + l2 * w @ w), -(transposed @ expit(-z)) / len(z) + 2 * l2 * w

    # One BLAS thread: on these small problems OpenBLAS's threads only wait for each other, and on a
    # busy 2-core machine that wait made a 15 ms fit of 14k n-gram weights take 200 ms.
    with threadpool_limits(limits=1, user_api="blas"):
        return optimize.minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                                 options={"maxiter": max_iter}).x


def _as_float64(x):
    return x.astype(np.float64) if x.dtype != np.float64 else x


def bradley_terry_loss(margins: np.ndarray, target_margin: np.ndarray | float = 0.0) -> float:
    """mean -log sigmoid(r_chosen - r_rejected - margin): the pairwise loss of InstructGPT and trl."""
    return float(np.logaddexp(0.0, -(np.asarray(margins, dtype=np.float64) - target_margin)).mean())


def tuning_split(prompts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit rows, check rows): a split of these training prompts to tune on; None when a side has under 10 pairs."""
    inner = np.array([is_held_out(p, salt="tune") for p in prompts], dtype=bool)
    if inner.sum() < 10 or (~inner).sum() < 10:  # too few pairs to tell settings apart
        return None
    return np.flatnonzero(~inner), np.flatnonzero(inner)


def choose_l2_per_pair(diffs, margin: np.ndarray, prompts: list[str]) -> tuple[float, np.ndarray | None]:
    """(the L2_PER_PAIR value with the lowest Bradley-Terry loss on the tuning split's check rows, the
    margins it gave those rows), or (the default, None) when there are too few pairs to tune."""
    split = tuning_split(prompts)
    if split is None:
        return DEFAULT_L2_PER_PAIR, None
    fit_rows, check_rows = split
    diffs, margin = _as_float64(diffs), np.asarray(margin, dtype=np.float64)
    checked = {}
    for per_pair in L2_PER_PAIR:
        w = fit_bradley_terry(diffs[fit_rows], margin[fit_rows], l2=per_pair / len(fit_rows))
        checked[per_pair] = diffs[check_rows] @ w
    best = min(checked, key=lambda per_pair: bradley_terry_loss(checked[per_pair], margin[check_rows]))
    return best, checked[best]


def calibrated_scale(check_margins: list[np.ndarray | None], margin: np.ndarray, prompts: list[str]) -> float:
    """The factor on the heads' summed margins with the lowest Bradley-Terry loss on the tuning split's
    check rows, which none of them trained on (1.0 when there were too few pairs to tune).

    Each head is fitted to be a reward model on its own, so their sum counts the evidence they share
    more than once and is over-confident. Calibrated margins keep /predict's confidence honest and the
    reward PPO sees on the scale of one Bradley-Terry model (the scale its KL settings were tuned on).
    """
    split = tuning_split(prompts)
    if split is None or any(m is None for m in check_margins):
        return 1.0
    summed, target = np.sum(check_margins, axis=0), np.asarray(margin, dtype=np.float64)[split[1]]
    return float(optimize.minimize_scalar(lambda s: bradley_terry_loss(s * summed, target), bounds=(0.0, 4.0),
                                          method="bounded").x)


@dataclass(frozen=True)
class LinearHead:
    """Bradley-Terry weights over one view's features, with the L2 (per pair) they were tuned to."""
    weights: np.ndarray  # (F,)
    l2_per_pair: float

    @classmethod
    def fit(cls, diffs, margin: np.ndarray, prompts: list[str]) -> tuple[LinearHead, np.ndarray | None]:
        """(head fitted from scratch on every given pair, the L2 chosen on a split of these prompts;
        the margins that L2 gave the split's check rows, out of sample)."""
        per_pair, check_margins = choose_l2_per_pair(diffs, margin, prompts)
        return cls(fit_bradley_terry(diffs, margin, l2=per_pair / max(1, len(prompts))), per_pair), check_margins

    def updated(self, diffs, margin: np.ndarray, total_pairs: int, iters: int) -> LinearHead:
        """Warm-started and moved a few L-BFGS steps on these (new + replayed) pairs.

        The L2 is scaled by every training pair seen so far, as a full refit would, since the replay
        sample stands in for all of them.
        """
        weights = fit_bradley_terry(diffs, margin, l2=self.l2_per_pair / max(1, total_pairs), init=self.weights,
                                    max_iter=iters)
        return LinearHead(weights, self.l2_per_pair)

    def to_json(self) -> dict:
        return {"weights": self.weights.tolist(), "l2_per_pair": self.l2_per_pair}

    @classmethod
    def from_json(cls, data: dict) -> LinearHead:
        return cls(np.asarray(data["weights"], dtype=np.float64), float(data["l2_per_pair"]))


# --- the surface view: character n-grams of the response ---
def ngram_vectorizer(min_df: int = 1, vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    """TF-IDF of character 2-5-grams inside word boundaries: spelling, punctuation, stock phrases."""
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, dtype=np.float64,
                           min_df=min_df, vocabulary=vocabulary)


@dataclass(frozen=True)
class NgramHead:
    """A Bradley-Terry head over TF-IDF character n-grams of the response.

    It errs on other pairs than the embedding heads (surface form vs meaning), so their sum beats
    each (bench/reward_learning.py). The vocabulary is fitted at each full refit and fixed in between:
    n-grams first seen after it count from the next full refit on.
    """
    vectorizer: TfidfVectorizer
    head: LinearHead

    @classmethod
    def fit(cls, prompts: list[str], chosen: list[str], rejected: list[str],
            margin: np.ndarray) -> tuple[NgramHead | None, np.ndarray | None]:
        """(head fitted from scratch, its vocabulary read from these texts, or None when they hold no
        n-gram; the check-row margins of `LinearHead.fit`)."""
        # an n-gram of one text teaches nothing about others, but a handful of pairs needs every one
        min_df = 2 if len(chosen) >= 25 else 1
        try:
            vectorizer = ngram_vectorizer(min_df).fit(list(chosen) + list(rejected))
        except ValueError:  # every text empty or blank: nothing to learn from
            return None, None
        head, check_margins = LinearHead.fit(ngram_diffs(vectorizer, chosen, rejected), margin, prompts)
        return cls(vectorizer, head), check_margins

    def updated(self, chosen: list[str], rejected: list[str], margin: np.ndarray, total_pairs: int,
                iters: int) -> NgramHead:
        """This head moved a few steps on these pairs, its vocabulary fixed."""
        diffs = ngram_diffs(self.vectorizer, chosen, rejected)
        return NgramHead(self.vectorizer, self.head.updated(diffs, margin, total_pairs, iters))

    def score(self, responses: list[str]) -> np.ndarray:
        return self.vectorizer.transform(responses) @ self.head.weights

    def to_json(self) -> dict:
        return {"vocabulary": {k: int(v) for k, v in self.vectorizer.vocabulary_.items()},
                "idf": self.vectorizer.idf_.tolist(), **self.head.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> NgramHead:
        vectorizer = ngram_vectorizer(vocabulary=data["vocabulary"])
        vectorizer.idf_ = np.asarray(data["idf"], dtype=np.float64)
        return cls(vectorizer, LinearHead.from_json(data))


def ngram_diffs(vectorizer: TfidfVectorizer, chosen: list[str], rejected: list[str]) -> sparse.csr_matrix:
    return (vectorizer.transform(chosen) - vectorizer.transform(rejected)).tocsr()


# --- the structural view: what the other views cannot count ---
# Embeddings are mean-pooled and n-gram vectors L2-normalised with sublinear tf, so none of them grows
# with how often a thing occurs: a preference for more sentences reached 82% agreement on held-out
# answers without this view and 99% with it (docs/reward.md), and is neutral on HH-harmless.
COUNTED = {
    "sentences": r"[.!?](?:\s|$)", "commas": r",", "lines": r"\n", "words": r"\b\w+\b", "digits": r"\d",
    "questions": r"\?", "colons": r"[:;]", "list_items": r"(?m)^\s*(?:\d+[.)]|[-*])\s",
}
STRUCTURE_FEATURES = (*COUNTED, "ends_a_sentence")
_COUNTED_RE = [re.compile(pattern) for pattern in COUNTED.values()]
_ENDS_A_SENTENCE = re.compile(r"[.!?][\"')\]]*\s*$")


def structure_features(responses: list[str]) -> np.ndarray:
    """(N, len(STRUCTURE_FEATURES)): log(1 + count) of each `COUNTED` pattern, and 1.0 where the
    response ends a sentence (an answer cut off at the token limit does not).

    Log counts, so one weight means "each doubling is worth this much" for short and long answers alike.
    """
    rows = [[np.log1p(len(regex.findall(r))) for regex in _COUNTED_RE] + [float(bool(_ENDS_A_SENTENCE.search(r)))]
            for r in responses]
    return np.asarray(rows, dtype=np.float64).reshape(len(responses), len(STRUCTURE_FEATURES))


def structure_diffs(chosen: list[str], rejected: list[str]) -> np.ndarray:
    return structure_features(chosen) - structure_features(rejected)


def score_margins(model, prompts: list[str], chosen: list[str], rejected: list[str]) -> np.ndarray:
    """(N,) score(chosen) - score(rejected) of either tier: positive where the model agrees with the pair."""
    return (np.asarray(model.score(prompts, chosen), dtype=np.float64)
            - np.asarray(model.score(prompts, rejected), dtype=np.float64))


@dataclass
class FitResult:
    model: RewardModel
    train_accuracy: float
    held_out_accuracy: float | None
    train_pairs: int
    held_out_pairs: int


def refit(model: RewardModel, prompts: list[str], chosen: list[str], rejected: list[str],
          margin: np.ndarray) -> RewardModel:
    """Every head fitted from scratch on every given pair, each with its L2 tuned on a split of these
    prompts, and the scale of their sum calibrated on that split."""
    margin = np.asarray(margin, dtype=np.float64)
    embedding_diffs, middle_diffs = model.pair_diffs(prompts, chosen, rejected)
    embedding, checked_embedding = LinearHead.fit(embedding_diffs, margin, prompts)
    middle, checked_middle = LinearHead.fit(middle_diffs, margin, prompts)
    structure, checked_structure = LinearHead.fit(structure_diffs(chosen, rejected), margin, prompts)
    ngrams, checked_ngrams = NgramHead.fit(prompts, chosen, rejected, margin)
    checked = [checked_embedding, checked_middle, checked_structure] + ([checked_ngrams] if ngrams is not None else [])
    return model.replace(embedding=embedding, middle=middle, ngrams=ngrams, structure=structure,
                         scale=calibrated_scale(checked, margin, prompts))


def refit_incrementally(model: RewardModel, prompts: list[str], chosen: list[str], rejected: list[str],
                        margin: np.ndarray, total_pairs: int, iters: int) -> RewardModel:
    """Every head warm-started and moved a few L-BFGS steps on these (new + replayed) pairs.

    The L2 is scaled by every training pair seen so far, as a full refit would, since the replay
    sample stands in for all of them. The calibrated scale waits for the next full refit, and so does
    a head a saved model lacks (saved before it existed).
    """
    margin = np.asarray(margin, dtype=np.float64)
    embedding_diffs, middle_diffs = model.pair_diffs(prompts, chosen, rejected)
    embedding = model.embedding.updated(embedding_diffs, margin, total_pairs, iters)
    middle = model.middle.updated(middle_diffs, margin, total_pairs, iters) if model.middle else None
    ngrams = model.ngrams.updated(chosen, rejected, margin, total_pairs, iters) if model.ngrams else None
    structure = (model.structure.updated(structure_diffs(chosen, rejected), margin, total_pairs, iters)
                 if model.structure else None)
    return model.replace(embedding=embedding, middle=middle, ngrams=ngrams, structure=structure)


class RewardModel:
    """The default tier: four Bradley-Terry heads, one per view of the text, their logits summed.

    - the embedding head (`embedding`): linear in `pair_features`, the encoder's final-layer view of
      the question and the response;
    - the middle head (`middle`): linear in the encoder's middle-layer view of the response;
    - the n-gram head (`ngrams`): linear in TF-IDF character n-grams of the response;
    - the structure head (`structure`): linear in `structure_features`, counts of the response's parts.
    Each head is fitted with its own tuned L2; the sum, times a `scale` calibrated on held-out pairs,
    beats each alone and every baseline (bench/reward_learning.py). The embedding head starts at
    zero; the others are None until the first fit.
    """

    tier = "head"

    def __init__(self, encoder: TextEncoder, embedding: LinearHead | None = None, version: int | None = None,
                 middle: LinearHead | None = None, ngrams: NgramHead | None = None,
                 structure: LinearHead | None = None, scale: float = 1.0):
        expected = num_features(encoder.dim)
        if embedding is not None and embedding.weights.shape != (expected,):
            raise ValueError(f"embedding head weights of shape {embedding.weights.shape} do not fit encoder "
                             f"{encoder.name!r}: expected ({expected},) = num_features({encoder.dim}); refit the head")
        if structure is not None and structure.weights.shape != (len(STRUCTURE_FEATURES),):
            raise ValueError(f"structure head weights of shape {structure.weights.shape} do not fit this version's "
                             f"{len(STRUCTURE_FEATURES)} STRUCTURE_FEATURES; refit the head")
        self.encoder = encoder
        self.embedding = embedding or LinearHead(np.zeros(expected), DEFAULT_L2_PER_PAIR)
        self.version = version
        self.middle = middle
        self.ngrams = ngrams
        self.structure = structure
        self.scale = scale

    def views(self, prompts: list[str], responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, F) `pair_features` and (N, 2D) middle-layer embeddings of the responses: what the two
        embedding heads are linear in, read from the store in one query."""
        questions = [last_human_turn(p) for p in prompts]
        embedded = self.encoder.embed_views(questions + list(responses))
        final, n = embedded["final"], len(questions)
        return pair_features(final[:n], final[n:], responses), embedded["middle"][n:]

    def pair_diffs(self, prompts: list[str], chosen: list[str],
                   rejected: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The views of chosen minus those of rejected: what each embedding head's margin is linear in."""
        n = len(chosen)
        features, middle = self.views(list(prompts) * 2, list(chosen) + list(rejected))  # one store query
        return features[:n] - features[n:], middle[:n] - middle[n:]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not responses:
            return []
        features, middle = self.views(prompts, responses)
        scores = features @ self.embedding.weights
        if self.middle is not None:
            scores = scores + middle @ self.middle.weights
        if self.ngrams is not None:
            scores = scores + self.ngrams.score(responses)
        if self.structure is not None:
            scores = scores + structure_features(responses) @ self.structure.weights
        return (self.scale * scores).tolist()

    def fit(self, prompts: list[str], chosen: list[str], rejected: list[str], margins: list[float]) -> FitResult:
        """Refit every head on every training pair, L2 tuned on a split of the training prompts;
        measure the sum on held-out prompts (`is_held_out`)."""
        held = np.array([is_held_out(p) for p in prompts], dtype=bool)
        train = ~held if (~held).any() else np.ones_like(held)
        pick = lambda xs, mask: [x for x, m in zip(xs, mask) if m]  # noqa: E731
        fitted = refit(self, pick(prompts, train), pick(chosen, train), pick(rejected, train),
                       np.asarray(margins, dtype=np.float64)[train])
        accuracy = lambda mask: float((score_margins(fitted, pick(prompts, mask), pick(chosen, mask),  # noqa: E731
                                                     pick(rejected, mask)) > 0).mean())
        return FitResult(model=fitted, train_accuracy=accuracy(train),
                         held_out_accuracy=accuracy(held) if held.any() else None,
                         train_pairs=int(train.sum()), held_out_pairs=int(held.sum()))

    def replace(self, **changes) -> RewardModel:
        """A new model on the same encoder with some fields changed: fitting never mutates the served model."""
        fields = {"embedding": self.embedding, "version": None, "middle": self.middle, "ngrams": self.ngrams,
                  "structure": self.structure, "scale": self.scale}
        return RewardModel(self.encoder, **{**fields, **changes})

    def save(self, directory: Path) -> None:
        """Write every head atomically: a crash mid-write never leaves a broken version directory."""
        meta = {"tier": self.tier, "encoder": self.encoder.name, "dim": self.encoder.dim, "scale": self.scale}
        heads = {"embedding": self.embedding, "middle": self.middle, "ngrams": self.ngrams,
                 "structure": self.structure}
        with atomic_directory(directory) as staging:
            for name, head in heads.items():
                if head is not None:
                    (staging / f"{name}.json").write_text(json.dumps(head.to_json()))
            (staging / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, encoder: TextEncoder, version: int | None = None) -> RewardModel:
        meta = json.loads((directory / "meta.json").read_text())
        if meta["encoder"] != encoder.name:
            raise ValueError(
                f"reward model {directory} was fitted on encoder {meta['encoder']!r}, but REWARD_MODEL={encoder.name!r}: "
                "set REWARD_MODEL back, or refit"
            )
        read = lambda name: json.loads((directory / f"{name}.json").read_text())  # noqa: E731
        has = lambda name: (directory / f"{name}.json").exists()  # noqa: E731
        if has("embedding"):
            embedding = LinearHead.from_json(read("embedding"))
        else:  # saved before the embedding head was a LinearHead: torch weights, the L2 in meta.json
            embedding = LinearHead(torch.load(directory / "head.pt").double().numpy(),
                                   float(meta.get("l2_per_pair", DEFAULT_L2_PER_PAIR)))
        # middle, ngrams and structure are absent in versions saved before those heads existed
        return cls(encoder, embedding, version=version,
                   middle=LinearHead.from_json(read("middle")) if has("middle") else None,
                   ngrams=NgramHead.from_json(read("ngrams")) if has("ngrams") else None,
                   structure=LinearHead.from_json(read("structure")) if has("structure") else None,
                   scale=float(meta.get("scale", 1.0)))


def finetune_text(prompt: str, response: str) -> str:
    """What the fine-tuned tier reads: the question, a separator line, the response, clipped in characters."""
    question = last_human_turn(prompt)[-FINETUNE_MAX_CHARS // 3:]
    return f"{question}\n\n{response}"[:FINETUNE_MAX_CHARS]


class FineTunedRewardModel:
    """A sequence-classification model with one output (e.g. MiniLM fine-tuned by trl's RewardTrainer)."""

    tier = "finetune"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, version: int | None = None,
                 batch_size: int = 16):
        if model.config.num_labels != 1:
            raise ValueError(f"a reward model needs num_labels=1, got {model.config.num_labels}: "
                             "load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)")
        self.model, self.tokenizer, self.version, self.batch_size = model.eval(), tokenizer, version, batch_size

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [finetune_text(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                 max_length=512, return_tensors="pt").to(self.model.device)
            out += self.model(**enc).logits[:, 0].tolist()  # (B,)
        return out

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            self.model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            (staging / "meta.json").write_text(json.dumps({"tier": self.tier}))

    @classmethod
    def load(cls, directory: Path, version: int | None = None) -> FineTunedRewardModel:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, dtype=torch.float32)
        return cls(model, tokenizer, version)


def load_reward_model(directory: Path, encoder: TextEncoder, version: int | None = None):
    """Either tier from a version directory, as its meta.json says (heads saved before tiers existed are heads)."""
    tier = json.loads((directory / "meta.json").read_text()).get("tier", "head")
    if tier == "head":
        return RewardModel.load(directory, encoder, version)
    if tier == "finetune":
        return FineTunedRewardModel.load(directory, version)
    raise ValueError(f"reward model {directory} has unknown tier {tier!r}: expected 'head' or 'finetune'")


