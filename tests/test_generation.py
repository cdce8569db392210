from backend.generation import TransformersGenerator, generate_candidates, render_prompt
from backend.models import load_causal_lm


def test_each_prompt_gets_k_candidates_tagged_with_the_policy_version(tiny_policy):
    model, tokenizer = load_causal_lm(str(tiny_policy))
    out = generate_candidates(TransformersGenerator(model, tokenizer, batch_size=2),
                              ["What is 2+2?", "Tell me a joke.", "Hi"], num_candidates=3, max_new_tokens=6,
                              policy_version=5)
    assert [len(c) for c in out] == [3, 3, 3]
    assert all(c.policy_version == 5 for cands in out for c in cands)
    item = out[0][0].as_list_item()
    assert set(item) == {"id", "title", "body", "policy_version"}
    assert [c.as_list_item()["title"] for c in out[0]] == ["Answer 1", "Answer 2", "Answer 3"]


def test_candidate_ids_are_unique_to_their_generation(tiny_policy):
    """Regenerated candidates never reuse an id, so no old ranking or prediction can name the new text."""
    model, tokenizer = load_causal_lm(str(tiny_policy))
    first, again = (generate_candidates(TransformersGenerator(model, tokenizer), ["Hi", "Hi"], num_candidates=3,
                                        max_new_tokens=4, policy_version=0) for _ in range(2))
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
        [candidates] = generate_candidates(TransformersGenerator(model, tokenizer), [long_prompt], num_candidates=2,
                                           max_new_tokens=6, policy_version=0)
    assert len(candidates) == 2 and "was cut to its last 506 tokens" in caplog.text


class EchoEngine:
    """A second engine behind the Generator interface: deterministic text, no model."""

    name = "echo"

    def __init__(self):
        self.calls: list[tuple[list[str], int, int, float]] = []

    def sample(self, prompts, num_samples, max_new_tokens, temperature):
        self.calls.append((prompts, num_samples, max_new_tokens, temperature))
        return [[f"{prompt} #{k}" for k in range(num_samples)] for prompt in prompts]


def test_candidates_come_from_whichever_engine_is_behind_the_generator_interface():
    engine = EchoEngine()
    [first, second] = generate_candidates(engine, ["a", "b"], num_candidates=2, max_new_tokens=9, policy_version=3,
                                          temperature=0.7)
    assert [c.body for c in first + second] == ["a #0", "a #1", "b #0", "b #1"]
    assert engine.calls == [(["a", "b"], 2, 9, 0.7)]  # every prompt of a job in one call: the engine batches
    assert {c.policy_version for c in first + second} == {3} and [c.position for c in second] == [0, 1]


def test_an_engine_that_returns_the_wrong_number_of_completions_is_refused():
    import pytest

    class Short(EchoEngine):
        def sample(self, prompts, num_samples, max_new_tokens, temperature):
            return [["only one"] for _ in prompts]

    with pytest.raises(RuntimeError, match=r"the echo engine returned \[1, 1\] completions for 2 prompts x 3"):
        generate_candidates(Short(), ["a", "b"], num_candidates=3, max_new_tokens=4, policy_version=0)


def test_vllm_refuses_with_the_fix_where_it_cannot_run(tiny_policy):
    import importlib.util

    import pytest
    import torch

    from backend.generation import VLLMGenerator

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM can run here: tests/test_gpu.py exercises it")
    _, tokenizer = load_causal_lm(str(tiny_policy))
    with pytest.raises(RuntimeError, match="GENERATION_ENGINE=transformers"):
        VLLMGenerator(str(tiny_policy), tokenizer)


def test_generating_in_bfloat16_uses_a_copy_and_leaves_the_float32_policy_for_training(tiny_policy):
    import torch

    from backend.generation import transformers_generator

    model, tokenizer = load_causal_lm(str(tiny_policy))
    engine = transformers_generator(model, tokenizer, batch_size=2, dtype=torch.bfloat16)
    assert engine.model.dtype == torch.bfloat16 and model.dtype == torch.float32 and engine.model is not model
    [candidates] = generate_candidates(engine, ["Hi"], num_candidates=2, max_new_tokens=4, policy_version=0)
    assert len(candidates) == 2
    assert transformers_generator(model, tokenizer, dtype=torch.float32).model is model  # no copy needed


def test_auto_dtype_is_bfloat16_only_where_the_hardware_computes_it(monkeypatch):
    import torch

    from backend import generation

    monkeypatch.setattr(generation, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert generation.generation_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(generation, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert generation.generation_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert generation.generation_dtype("float32", torch.device("cpu")) == torch.float32


def test_a_prompt_that_exactly_fills_the_room_is_not_reported_as_cut(tiny_policy, caplog):
    model, tokenizer = load_causal_lm(str(tiny_policy))  # 512 positions, 6 new tokens: room for 506

    def length(prompt: str) -> int:
        return len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])

    prompt = ""
    while length(prompt) < 506:  # one more character at a time, so the length steps through 506
        grown = prompt + "a b"[len(prompt) % 3]
        prompt = grown if length(grown) <= 506 else prompt + "."
    assert length(prompt) == 506
    with caplog.at_level("WARNING", logger="backend.generation"):
        generate_candidates(TransformersGenerator(model, tokenizer), [prompt], num_candidates=2, max_new_tokens=6,
                            policy_version=0)
    assert "was cut" not in caplog.text
