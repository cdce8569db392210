from backend.generation import generate_candidates, render_prompt
from backend.models import load_causal_lm


def test_each_prompt_gets_k_candidates_tagged_with_the_policy_version(tiny_policy):
    model, tokenizer = load_causal_lm(str(tiny_policy))
    out = generate_candidates(model, tokenizer, ["What is 2+2?", "Tell me a joke.", "Hi"], num_candidates=3,
                              max_new_tokens=6, policy_version=5, batch_size=2)
    assert [len(c) for c in out] == [3, 3, 3]
    assert all(c.policy_version == 5 for cands in out for c in cands)
    item = out[0][0].as_list_item()
    assert set(item) == {"id", "title", "body", "policy_version"}
    assert [c.as_list_item()["title"] for c in out[0]] == ["Answer 1", "Answer 2", "Answer 3"]


def test_candidate_ids_are_unique_to_their_generation(tiny_policy):
    """Regenerated candidates never reuse an id, so no old ranking or prediction can name the new text."""
    model, tokenizer = load_causal_lm(str(tiny_policy))
    first, again = (generate_candidates(model, tokenizer, ["Hi", "Hi"], num_candidates=3, max_new_tokens=4,
                                        policy_version=0) for _ in range(2))
    ids = [c.id for cands in first + again for c in cands]
    assert len(set(ids)) == len(ids) == 12


def test_instruct_prompts_are_rendered_with_the_chat_template(tiny_policy):
    _, tokenizer = load_causal_lm(str(tiny_policy))
    text = render_prompt(tokenizer, "Hello?")
    assert text.startswith("<|im_start|>user\nHello?") and text.endswith("<|im_start|>assistant\n")


def test_a_prompt_longer_than_the_context_is_cut_to_its_end_with_a_warning(tiny_policy, caplog):
    model, tokenizer = load_causal_lm(str(tiny_policy))  # a context of 512 positions
    long_prompt = "word " * 3000 + "What is the last question?"
    with caplog.at_level("WARNING", logger="backend.generation"):
        [candidates] = generate_candidates(model, tokenizer, [long_prompt], num_candidates=2, max_new_tokens=6,
                                           policy_version=0)
    assert len(candidates) == 2 and "was cut to its last 506 tokens" in caplog.text
