"""PPO's speed on one device: rollout tokens/s, seconds per update and peak memory, per batch size.

In:  a policy directory (config and tokenizer; with `--random-weights` the weights are drawn from the
     config, for a machine without the model files, e.g. a GPU box that cannot reach the hub), a
     device and the batch sizes to try.
Out: a markdown table on stdout, and `--json` if given.

Speed does not depend on the weights, with one catch: random weights rarely sample an eos, so every
response runs to `--max-new-tokens`. Each batch size runs `--steps` PPO steps (the first is warm-up and
is not counted) and then the held-out check the worker runs before publishing (`compare_on_held_out`),
so the whole training path runs on the device. The reward is the answer's length, a stand-in: the
reward model scores text on the CPU whatever the policy's device.

    python bench/ppo_device.py                       # the bundled SmolLM2 on cuda if there is one, else cpu
    python bench/ppo_device.py --policy DIR --random-weights --device cuda --batch-sizes 8 16 64 256
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.evaluation import compare_on_held_out  # noqa: E402
from backend.models import DEFAULT_POLICY, load_causal_lm, load_policy_tokenizer, resolve_policy  # noqa: E402
from backend.ppo import PPOConfig, train_ppo  # noqa: E402

TOPICS = ["the ocean", "bread", "the moon", "piano practice", "sleep", "volcanoes", "tea", "bicycles",
          "rain", "chess", "gardening", "owls", "maps", "the heart", "glass", "bees"]
PROMPTS = [f"{q} {t}?" for q in ("Tell me about", "Why should I care about", "What is surprising about",
                                 "Give me one tip about") for t in TOPICS]  # 64 prompts, cycled


def answer_length(prompts: list[str], answers: list[str]) -> list[float]:
    """The stand-in reward: speed does not depend on what the reward is."""
    return [float(len(a)) for a in answers]


@dataclass
class Row:
    batch_size: int
    rollout_tokens_per_s: float  # median over the counted steps
    seconds_per_update: float  # median over the counted steps: the optimisation part of a step
    seconds_per_step: float  # median: rollout + update
    held_out_check_s: float  # compare_on_held_out on 8 prompts x 4 answers
    peak_memory_gb: float  # GPU: max allocated; CPU: the process's peak RSS


def policy_and_tokenizer(path: str, random_weights: bool, device: torch.device):
    """The policy on `device` in eval mode, and its tokenizer (left-padded, as load_causal_lm gives it)."""
    if random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
        tokenizer = load_policy_tokenizer(path)
    else:
        model, tokenizer = load_causal_lm(path)
    return model.to(device), tokenizer


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(model, tokenizer, batch_size: int, args) -> Row:
    device = model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = PPOConfig(steps=args.steps, batch_size=batch_size, mini_batch_size=max(batch_size // 2, 1),
                       max_new_tokens=args.max_new_tokens, learning_rate=5e-4, lora_rank=16, init_kl_coef=0.02)
    trained, stats = train_ppo(model, tokenizer, PROMPTS, answer_length, config)
    counted = stats[1:] or stats  # the first step pays for warm-up (kernels, allocator)
    started = time.perf_counter()
    compare_on_held_out(trained, model, tokenizer, PROMPTS[:8], answer_length,
                        samples=4, max_new_tokens=args.max_new_tokens, seed=0)
    check_seconds = time.perf_counter() - started
    return Row(
        batch_size=batch_size,
        rollout_tokens_per_s=statistics.median(s.response_tokens / s.rollout_seconds for s in counted),
        seconds_per_update=statistics.median(s.seconds - s.rollout_seconds for s in counted),
        seconds_per_step=statistics.median(s.seconds for s in counted),
        held_out_check_s=check_seconds,
        peak_memory_gb=peak_memory_gb(device),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="directory with config.json and the tokenizer files; default: the bundled "
                        "SmolLM2-135M-Instruct")
    parser.add_argument("--random-weights", action="store_true", help="draw the weights from the config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--steps", type=int, default=3, help="PPO steps per batch size; the first is warm-up")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: need at least 2, as the first step is warm-up and not counted")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    policy = args.policy or resolve_policy(DEFAULT_POLICY, Path(__file__).resolve().parents[1] / ".cache")
    model, tokenizer = policy_and_tokenizer(policy, args.random_weights, device)
    rows = [measure(model, tokenizer, b, args) for b in args.batch_sizes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    weights = "random" if args.random_weights else "real"
    print(f"## PPO on {device.type} ({name}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"fp32, LoRA r=16, {args.max_new_tokens} new tokens, {weights} weights)\n")
    print("| prompts a step | rollout tokens/s | s / update | s / step | held-out check s | peak memory GB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.batch_size} | {r.rollout_tokens_per_s:.0f} | {r.seconds_per_update:.2f} "
              f"| {r.seconds_per_step:.2f} | {r.held_out_check_s:.1f} | {r.peak_memory_gb:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
