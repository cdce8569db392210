import json
import math

import numpy as np
import pytest
import torch
from scipy import sparse

from backend.reward import (
    LinearHead,
    NgramHead,
    RewardModel,
    TextEncoder,
    bradley_terry_loss,
    calibrated_scale,
    fit_bradley_terry,
    tuning_split,
    is_held_out,
    last_human_turn,
    load_reward_model,
    num_features,
    ranking_confidence,
    refit_incrementally,
    structure_features,
    STRUCTURE_FEATURES,
)


def random_head(encoder) -> LinearHead:
    return LinearHead(np.random.default_rng(0).normal(size=num_features(encoder.dim)), 0.5)


def test_bradley_terry_loss_matches_hand_computed_value():
    loss = bradley_terry_loss(np.array([2.0, 0.0]) - np.array([1.0, 0.0]))
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(0.5)) / 2
    assert loss == pytest.approx(expected, rel=1e-9)


def test_margin_raises_the_loss_of_a_narrow_win():
    assert bradley_terry_loss(np.array([0.5]), np.array([1.0])) > bradley_terry_loss(np.array([0.5]), np.array([0.0]))


def test_fitted_head_solves_the_regularised_bradley_terry_optimum():
    # one feature, every pair's difference 1: the optimum w* has -sigmoid(-w*) + 2·l2·w* = 0
    w = fit_bradley_terry(np.ones((8, 1)), np.zeros(8), l2=0.1)[0]
    assert -1 / (1 + math.exp(w)) + 2 * 0.1 * w == pytest.approx(0.0, abs=1e-5)
    assert 0 < w < 5


def test_sparse_and_dense_features_fit_the_same_head():
    rng = np.random.default_rng(0)
    diffs = rng.normal(size=(40, 6)) * (rng.random((40, 6)) < 0.3)  # mostly zeros, as n-gram differences are
    margin = rng.random(40)
    dense = fit_bradley_terry(diffs, margin, l2=0.01)
    assert np.allclose(fit_bradley_terry(sparse.csr_matrix(diffs), margin, l2=0.01), dense, atol=1e-4)


def test_ranking_confidence_is_half_for_ties_and_grows_with_gaps():
    assert ranking_confidence([0.0, 0.0, 0.0]) == pytest.approx(0.5)
    assert ranking_confidence([3.0, 0.0]) > ranking_confidence([1.0, 0.0]) > 0.5


def test_embeddings_are_cached_in_the_store_for_other_processes(encoder, store):
    first = encoder.embed(["hello world", "bake bread"])
    other = TextEncoder(encoder.model, encoder.tokenizer, name="tiny", store=store)
    other._embed_uncached = lambda texts: pytest.fail(f"recomputed {texts}")  # a cache hit never embeds
    assert torch.allclose(torch.from_numpy(other.embed(["bake bread", "hello world"])), torch.from_numpy(first[::-1].copy()))


def test_fitting_learns_a_consistent_preference(encoder):
    prompts = [f"question {i}?" for i in range(40)]
    chosen = [f"the answer is {i} days in a week" for i in range(40)]
    rejected = ["I am sorry, I cannot help with that." for _ in range(40)]
    model = RewardModel(encoder)
    result = model.fit(prompts, chosen, rejected, [0.0] * 40)
    fitted = result.model
    assert result.train_accuracy == 1.0 and fitted.ngrams is not None
    good, bad = fitted.score(["question 99?"] * 2, ["the answer is 99 days in a week", "I am sorry, I cannot help."])
    assert good > bad


def test_held_out_split_is_by_prompt_and_about_a_fifth():
    prompts = [f"prompt number {i}" for i in range(2000)]
    held = sum(is_held_out(p) for p in prompts)
    assert 300 < held < 500
    assert all(is_held_out(p) == is_held_out(p) for p in prompts[:10])


def test_saved_head_loads_back_and_refuses_another_encoder(encoder, tmp_path):
    model = RewardModel(encoder, random_head(encoder))
    model.save(tmp_path / "v0001")
    loaded = RewardModel.load(tmp_path / "v0001", encoder)
    assert np.array_equal(loaded.embedding.weights, model.embedding.weights)
    other = TextEncoder(encoder.model, encoder.tokenizer, name="other-encoder", store=None)
    with pytest.raises(ValueError, match="REWARD_MODEL"):
        RewardModel.load(tmp_path / "v0001", other)


def test_a_version_saved_with_torch_weights_before_the_heads_were_json_still_loads(encoder, tmp_path):
    weights = torch.randn(num_features(encoder.dim))
    (tmp_path / "v1").mkdir()
    torch.save(weights, tmp_path / "v1" / "head.pt")
    (tmp_path / "v1" / "meta.json").write_text(json.dumps({"tier": "head", "encoder": encoder.name,
                                                           "dim": encoder.dim, "l2_per_pair": 1.5}))
    loaded = RewardModel.load(tmp_path / "v1", encoder)
    assert np.allclose(loaded.embedding.weights, weights.double().numpy()) and loaded.embedding.l2_per_pair == 1.5
    assert loaded.middle is None and loaded.ngrams is None and loaded.scale == 1.0


def test_last_human_turn_takes_the_final_request_of_a_dialogue():
    dialogue = "Human: hi\n\nAssistant: hello\n\nHuman: how do I bake bread?\n\nAssistant:"
    assert last_human_turn(dialogue) == "how do I bake bread?"
    assert last_human_turn("  What is 2+2? ") == "What is 2+2?"


def test_score_depends_on_the_last_human_turn_not_the_earlier_dialogue(encoder):
    model = RewardModel(encoder, random_head(encoder))
    a = model.score(["Human: bake bread\n\nAssistant: ok\n\nHuman: a joke?\n\nAssistant:"], ["why did the chicken"])
    b = model.score(["Human: France\n\nAssistant: Paris\n\nHuman: a joke?\n\nAssistant:"], ["why did the chicken"])
    c = model.score(["a joke?"], ["why did the chicken"])
    assert a == pytest.approx(b) and a == pytest.approx(c)


def test_weights_of_the_wrong_length_are_refused_with_the_fix(encoder):
    with pytest.raises(ValueError, match="refit the head"):
        RewardModel(encoder, LinearHead(np.zeros(2 * encoder.dim + 1), 0.5))


def test_fit_tunes_l2_on_the_training_prompts_and_every_head_loads_back_scoring_the_same(encoder, tmp_path):
    prompts = [f"question {i}?" for i in range(80)]
    model = RewardModel(encoder).fit(prompts, [f"the answer is {i}" for i in range(80)],
                                     ["I am sorry, I cannot help." for _ in range(80)], [0.0] * 80).model
    model.save(tmp_path / "v1")
    loaded = load_reward_model(tmp_path / "v1", encoder)
    assert loaded.embedding.l2_per_pair == model.embedding.l2_per_pair
    assert loaded.middle.l2_per_pair == model.middle.l2_per_pair
    assert loaded.ngrams.head.l2_per_pair == model.ngrams.head.l2_per_pair
    assert loaded.structure.l2_per_pair == model.structure.l2_per_pair
    texts = ["the answer is 7", "I am sorry", "never seen before"]
    assert loaded.score(["q?"] * 3, texts) == pytest.approx(model.score(["q?"] * 3, texts), abs=1e-9)


def test_ngram_head_learns_a_surface_preference_and_keeps_its_vocabulary_when_updated():
    prompts = [f"question {i}?" for i in range(60)]
    chosen = [f"Thank you for asking! Item {i} is fine." for i in range(60)]
    rejected = [f"Item {i} is fine." for i in range(60)]
    head, _ = NgramHead.fit(prompts, chosen, rejected, np.zeros(60))
    polite, blunt = head.score(["Thank you! Item 99 is fine.", "Item 99 is fine."])
    assert polite > blunt
    updated = head.updated(["zebra zebra"], ["Item 5 is fine."], np.zeros(1), total_pairs=61, iters=5)
    assert updated.vectorizer.vocabulary_ == head.vectorizer.vocabulary_  # new n-grams wait for a full refit
    assert not np.array_equal(updated.head.weights, head.head.weights)


def test_ngram_head_of_empty_texts_is_absent_not_an_error():
    assert NgramHead.fit(["q"], [""], ["   "], np.zeros(1)) == (None, None)


def test_a_version_saved_before_the_middle_and_ngram_heads_existed_scores_with_its_embedding_head(encoder, tmp_path):
    model = RewardModel(encoder).fit([f"q{i}" for i in range(30)], [f"yes {i}" for i in range(30)],
                                     ["no" for _ in range(30)], [0.0] * 30).model
    model.save(tmp_path / "v1")
    (tmp_path / "v1" / "ngrams.json").unlink()
    (tmp_path / "v1" / "middle.json").unlink()
    (tmp_path / "v1" / "structure.json").unlink()
    old = load_reward_model(tmp_path / "v1", encoder)
    assert (old.middle, old.ngrams, old.structure) == (None, None, None)
    assert old.score(["q"], ["yes 3"]) == pytest.approx(
        model.replace(middle=None, ngrams=None, structure=None).score(["q"], ["yes 3"]))


def test_one_forward_pass_caches_both_views_of_a_text(encoder, store):
    cached = TextEncoder(encoder.model, encoder.tokenizer, name="views", store=store)
    final = cached.embed(["a new text"])
    reader = TextEncoder(encoder.model, encoder.tokenizer, name="views", store=store)
    reader._embed_uncached = lambda texts: pytest.fail(f"recomputed {texts}")
    assert reader.embed(["a new text"], "middle").shape == (1, cached.view_dim("middle"))
    assert np.array_equal(reader.embed(["a new text"]), final)


def test_a_failed_save_leaves_the_previous_version_intact(encoder, tmp_path, monkeypatch):
    root = tmp_path / "reward"
    ones = np.ones(num_features(encoder.dim))
    RewardModel(encoder, LinearHead(ones, 0.5)).save(root / "v1")
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        RewardModel(encoder, LinearHead(np.zeros_like(ones), 0.5)).save(root / "v1")
    monkeypatch.undo()
    assert np.array_equal(RewardModel.load(root / "v1", encoder).embedding.weights, ones)
    assert [p.name for p in root.iterdir()] == ["v1"]  # no staging directory left behind


def test_calibration_halves_the_sum_of_two_heads_that_carry_the_same_evidence():
    prompts = [f"prompt {i}" for i in range(400)]
    check = tuning_split(prompts)[1]
    rng = np.random.default_rng(0)
    z = rng.uniform(-3, 3, len(check))
    won = rng.random(len(check)) < 1 / (1 + np.exp(-z))  # each pair's chosen answer wins with P = sigmoid(z)
    margins = np.where(won, z, -z)  # a calibrated head's margin for (chosen, rejected)
    one = calibrated_scale([margins], np.zeros(len(prompts)), prompts)
    two = calibrated_scale([margins, margins], np.zeros(len(prompts)), prompts)
    assert 0.7 < one < 1.3  # one calibrated head needs (about) no correction
    assert two == pytest.approx(one / 2, rel=1e-3)
    assert calibrated_scale([None], np.zeros(3), prompts[:3]) == 1.0  # too few pairs to calibrate on


def test_scoring_reads_every_view_of_questions_and_answers_in_one_store_query(encoder, store, monkeypatch):
    model = RewardModel(TextEncoder(encoder.model, encoder.tokenizer, name="one-query", store=store),
                        random_head(encoder), middle=LinearHead(np.ones(2 * encoder.dim), 0.5))
    first = model.score(["q one?", "q two?"], ["an answer", "another answer"])  # embeds and caches
    queries = []
    real = store.get_embeddings
    monkeypatch.setattr(store, "get_embeddings", lambda keys: queries.append(keys) or real(keys))
    assert model.score(["q one?", "q two?"], ["an answer", "another answer"]) == pytest.approx(first)
    assert len(queries) == 1 and len(queries[0]) == 8  # 2 questions + 2 answers, each in 2 views


def test_structure_features_are_log_counts_of_sentences_lines_and_words_and_whether_the_answer_ends_a_sentence():
    counted = np.expm1(structure_features(["Mix it. Bake it, then rest!\n- Serve 2 hot?", "Cut off at the"]))
    first, second = (dict(zip(STRUCTURE_FEATURES, row.round(6))) for row in counted)
    assert (first["sentences"], first["commas"], first["lines"], first["words"], first["digits"]) == (3, 1, 1, 9, 1)
    assert (first["questions"], first["list_items"]) == (1, 1)
    assert first["ends_a_sentence"] == pytest.approx(math.e - 1) and second["ends_a_sentence"] == 0
    assert (second["sentences"], second["words"]) == (0, 4)
    assert structure_features([]).shape == (0, len(STRUCTURE_FEATURES))


def sentence_pairs(n: int) -> tuple[list[str], list[str], list[str]]:
    """The same words, chosen as finished sentences, rejected run together: only the count differs."""
    steps = ["mix the flour", "add the water", "knead the dough", "let it rise", "bake it hot", "serve it warm"]
    prompts, chosen, rejected = [], [], []
    for i in range(n):
        words = [steps[(i + k) % len(steps)] for k in range(2 + i % 3)]
        prompts.append(f"how do I make bread {i}?")
        chosen.append(". ".join(w.capitalize() for w in words) + ".")
        rejected.append(" and ".join(words).capitalize() + ".")
    return prompts, chosen, rejected


def test_the_structure_head_learns_a_preference_for_more_sentences_and_is_updated_incrementally(encoder):
    prompts, chosen, rejected = sentence_pairs(60)
    fitted = RewardModel(encoder).fit(prompts, chosen, rejected, [0.0] * 60).model
    weights = dict(zip(STRUCTURE_FEATURES, fitted.structure.weights))
    assert weights["sentences"] > 0
    alone = fitted.replace(embedding=LinearHead(np.zeros_like(fitted.embedding.weights), 0.0), middle=None, ngrams=None)
    unseen = ["Boil the eggs. Peel them. Eat them.", "Boil the eggs and peel them and eat them."]
    assert np.diff(alone.score(["q?"] * 2, unseen))[0] < 0 and np.diff(fitted.score(["q?"] * 2, unseen))[0] < 0
    moved = refit_incrementally(fitted, prompts[:5], rejected[:5], chosen[:5], np.zeros(5), total_pairs=65, iters=5)
    assert not np.array_equal(moved.structure.weights, fitted.structure.weights)


def test_structure_weights_of_another_length_are_refused_with_the_fix(encoder):
    with pytest.raises(ValueError, match="STRUCTURE_FEATURES; refit the head"):
        RewardModel(encoder, structure=LinearHead(np.zeros(len(STRUCTURE_FEATURES) - 1), 0.5))
