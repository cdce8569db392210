"""Candidate generation: prompts in, `Candidate` records (K sampled completions each) out.

Prompts are rendered with the tokenizer's chat template when it has one (instruct models),
left-padded and generated in batches across prompts; each candidate records the policy
version that wrote it, so later stages can tell which policy an annotator judged.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

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
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                        truncation=room is not None, max_length=room).to(model.device)
        if room is not None and enc["input_ids"].shape[1] >= room:
            log.warning("a prompt longer than the policy's context less MAX_NEW_TOKENS (%d tokens) was cut to "
                        "its last %d tokens", room, room)
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


def generate_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    num_candidates: int,
    max_new_tokens: int,
    policy_version: int,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[list[Candidate]]:
    """K candidates for each prompt, tagged with the policy version that wrote them, with ids new to this call."""
    samples = sample_completions(model, tokenizer, prompts, num_candidates, max_new_tokens, temperature, batch_size)
    candidates = []
    for bodies in samples:
        generation = uuid.uuid4().hex[:8]
        candidates.append([Candidate(id=f"{generation}-{k}", body=body, policy_version=policy_version, position=k)
                           for k, body in enumerate(bodies)])
    return candidates
