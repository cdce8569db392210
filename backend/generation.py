"""Candidate generation: prompts in, `Candidate` records (K sampled completions each) out.

Prompts are rendered with the tokenizer's chat template when it has one (instruct models). One
interface, `Generator`, has two engines: the batched transformers generator (the default; prompts
left-padded and generated in batches across prompts and tasks) and vLLM (`GENERATION_ENGINE=vllm`,
on a CUDA GPU with the `vllm` extra). Each candidate records the policy version that wrote it, so
later stages can tell which policy an annotator judged.
"""

from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    # the item id Label Studio's Ranker orders: unique to this generation of this task ("3f9a1c2e-0", ...),
    # so a ranking or prediction made for a task's earlier candidates can never name these
    id: str
    body: str
    policy_version: int
    position: int = 0  # 0, 1, ...: the answer's place in the task

    def as_list_item(self) -> dict:
        """The `{id, title, body}` item that `<List value="$answers">` shows."""
        return {"id": self.id, "title": f"Answer {self.position + 1}", "body": self.body,
                "policy_version": self.policy_version}


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the policy continues: the chat template with a generation prompt, if any."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def prompt_room(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """Tokens a prompt may take: the policy's context less the tokens it will write (None: unbounded)."""
    context = getattr(model.config, "max_position_embeddings", None)
    return max(1, context - max_new_tokens) if context else None


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[list[str]]:
    """`num_samples` sampled completions for each prompt, generated `batch_size` prompts at a time."""
    completions: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [render_prompt(tokenizer, p) for p in chunk]
        room = prompt_room(model, max_new_tokens)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        if room is not None and enc["input_ids"].shape[1] > room:  # padded to its longest prompt: one is over
            log.warning("a prompt longer than the policy's context less MAX_NEW_TOKENS (%d tokens) was cut to "
                        "its last %d tokens", room, room)
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, truncation=True,
                            max_length=room)
        enc = enc.to(model.device)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            pad_token_id=tokenizer.pad_token_id,
        )  # (len(chunk) * num_samples, prompt_len + new_len), grouped by prompt
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i in range(len(chunk)):
            completions.append([d.strip() for d in decoded[i * num_samples : (i + 1) * num_samples]])
    return completions


class Generator(Protocol):
    """An engine that samples completions: `num_samples` for each prompt, in the prompts' order."""

    name: str

    def sample(self, prompts: list[str], num_samples: int, max_new_tokens: int,
               temperature: float) -> list[list[str]]: ...


@dataclass
class TransformersGenerator:
    """The default engine: `model.generate` on the policy as loaded, `batch_size` prompts at a time."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int = 8
    name: str = "transformers"

    def sample(self, prompts: list[str], num_samples: int, max_new_tokens: int,
               temperature: float) -> list[list[str]]:
        return sample_completions(self.model, self.tokenizer, prompts, num_samples, max_new_tokens, temperature,
                                  self.batch_size)


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no native bfloat16
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware (AVX512-BF16 or AMX on CPUs, Ampere+ GPUs);
    elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def generation_dtype(name: str, device: torch.device) -> torch.dtype:
    """GENERATION_DTYPE -> the dtype the transformers engine generates in."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def transformers_generator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8,
                           dtype: torch.dtype = torch.float32) -> TransformersGenerator:
    """The transformers engine in `dtype`: a copy of the weights when that is not the policy's own dtype,
    so the float32 policy that training and the held-out checks read stays untouched."""
    if dtype != model.dtype:
        model = copy.deepcopy(model).to(dtype)
    return TransformersGenerator(model, tokenizer, batch_size=batch_size)


class VLLMGenerator:
    """vLLM on a CUDA GPU: continuous batching over every prompt of a job, with paged attention.

    One instance serves one policy version's directory (published versions are whole models, LoRA merged):
    a new version gets a new instance, and the registry drops the old one."""

    name = "vllm"

    def __init__(self, path: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0,
                 gpu_memory_utilization: float = 0.3):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("GENERATION_ENGINE=vllm needs vLLM: pip install -e '.[vllm]' on a machine with a "
                               "CUDA GPU, or set GENERATION_ENGINE=transformers") from None
        if not torch.cuda.is_available():
            raise RuntimeError("GENERATION_ENGINE=vllm needs a CUDA GPU and none is visible: set "
                               "GENERATION_ENGINE=transformers on this machine")
        self.tokenizer = tokenizer
        # the training worker shares the GPU: vLLM takes a fixed share of its memory, not all of it
        self.llm = LLM(model=path, tokenizer=path, seed=seed, gpu_memory_utilization=gpu_memory_utilization)

    def sample(self, prompts: list[str], num_samples: int, max_new_tokens: int,
               temperature: float) -> list[list[str]]:
        from vllm import SamplingParams

        # plain sampling, as the transformers engine: no top-k, no nucleus (PPO's log-probs assume it)
        params = SamplingParams(n=num_samples, temperature=temperature, top_p=1.0, top_k=-1,
                                max_tokens=max_new_tokens, skip_special_tokens=True)
        outputs = self.llm.generate([render_prompt(self.tokenizer, p) for p in prompts], params, use_tqdm=False)
        return [[completion.text.strip() for completion in output.outputs] for output in outputs]


def generate_candidates(
    generator: Generator,
    prompts: list[str],
    *,
    num_candidates: int,
    max_new_tokens: int,
    policy_version: int,
    temperature: float = 1.0,
) -> list[list[Candidate]]:
    """K candidates for each prompt, tagged with the policy version that wrote them, with ids new to this call."""
    samples = generator.sample(prompts, num_candidates, max_new_tokens, temperature)
    if len(samples) != len(prompts) or any(len(bodies) != num_candidates for bodies in samples):
        raise RuntimeError(f"the {generator.name} engine returned {[len(b) for b in samples]} completions for "
                           f"{len(prompts)} prompts x {num_candidates}")
    candidates = []
    for bodies in samples:
        generation = uuid.uuid4().hex[:8]
        candidates.append([Candidate(id=f"{generation}-{k}", body=body, policy_version=policy_version, position=k)
                           for k, body in enumerate(bodies)])
    return candidates
