"""Held-out evaluation of a policy: answers in, win-rates, NLL, KL and a publish decision out.

In:  answers of a new and a base policy to the same held-out prompts, a preference (a score
     function on answer text: higher is preferred), and the models that wrote the answers.
Out: the win-rate of the new answers, the sign-test p-value of that win, the mean per-token
     NLL of answers under a model (how far text strays from what the base policy would write),
     the KL between two policies estimated on sampled answers, and `should_publish`, the guard
     rail that lets only a policy shown better on held-out prompts serve candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from backend.generation import render_prompt, sample_completions

Preference = Callable[[str], float]
"""An answer's score under a fixed preference: of two answers, the higher one is preferred."""


# ----------------------------------------------------------------------------- win-rates


@dataclass(frozen=True)
class Tally:
    wins: int  # new answer preferred
    losses: int  # base answer preferred
    ties: int  # equal scores

    @property
    def win_rate(self) -> float:
        """(wins + ties / 2) / comparisons: 0.5 when the preference cannot tell the policies apart."""
        return (self.wins + 0.5 * self.ties) / (self.wins + self.losses + self.ties)


def tally(new_answers: list[str], base_answers: list[str], preference: Preference) -> Tally:
    """Wins, losses and ties of each new answer against the base answer at the same index."""
    if len(new_answers) != len(base_answers):
        raise ValueError(f"{len(new_answers)} new answers but {len(base_answers)} base answers: "
                         "pass one base answer per new answer (same prompt, same index)")
    if not new_answers:
        raise ValueError("no answers to compare: pass at least one pair of answers")
    new, base = [preference(a) for a in new_answers], [preference(a) for a in base_answers]
    wins = sum(n > b for n, b in zip(new, base))
    losses = sum(n < b for n, b in zip(new, base))
    return Tally(wins, losses, len(new) - wins - losses)


def win_rate(new_answers: list[str], base_answers: list[str], preference: Preference) -> float:
    """Fraction of paired comparisons the new answer wins under `preference`, a tie counting half."""
    return tally(new_answers, base_answers, preference).win_rate


def sign_test_p_value(wins: int, losses: int) -> float:
    """One-sided p-value of at least `wins` wins in `wins + losses` fair coin flips (ties dropped).

    The exact binomial sign test: small when the new policy wins more often than chance allows.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


# ----------------------------------------------------------------------------- likelihoods


@torch.no_grad()
def answer_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], answers: list[str],
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer: the summed log-probability (N,) of its tokens after the rendered prompt, and their count (N,).

    Answers are the stripped text the reward model and annotators see, re-tokenised; no eos is
    scored, as a cut-off answer has none. An empty answer scores 0 over 0 tokens.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: pass one prompt per answer")
    sums, counts = torch.zeros(len(answers)), torch.zeros(len(answers), dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(answers), batch_size):
        rows = []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            p = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
            rows.append((p, a))
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)  # (b, L) right-padded
        attention = torch.zeros_like(ids)  # (b, L)
        scored = torch.zeros_like(ids)  # (b, L) 1 on answer tokens
        for i, (p, a) in enumerate(rows):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            attention[i, :len(p) + len(a)] = 1
            scored[i, len(p):len(p) + len(a)] = 1
        ids, attention, scored = ids.to(model.device), attention.to(model.device), scored.to(model.device)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (b, L, V)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, L-1)
        mask = scored[:, 1:]  # position t predicts token t + 1
        sums[start:start + len(rows)] = (logp * mask).sum(-1).cpu()
        counts[start:start + len(rows)] = mask.sum(-1).cpu()
    return sums, counts


def answer_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
               answers: list[str]) -> float:
    """Mean negative log-likelihood per answer token (nats), pooled over every token of every answer."""
    sums, counts = answer_logprobs(model, tokenizer, prompts, answers)
    if counts.sum() == 0:
        raise ValueError("every answer is empty: there are no tokens to score")
    return float(-sums.sum() / counts.sum())


def held_out_nll(old_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                 new_answers: list[str], old_answers: list[str], samples: int) -> tuple[float, float, float]:
    """(NLL of the new answers, NLL of the old policy's own answers, standard error of the rise): the old
    policy's NLL per token, pooled over every token; the rise is the first minus the second, and its
    standard error that of the per-prompt difference, `samples` consecutive answers per prompt as
    `sample_completions` returns them."""
    pooled, per_prompt = [], []
    for answers in (new_answers, old_answers):
        sums, counts = answer_logprobs(old_model, tokenizer, prompts, answers)
        pooled.append(float(-sums.sum() / counts.sum().clamp(min=1)))
        per_prompt.append((-sums.view(-1, samples).sum(-1) / counts.view(-1, samples).sum(-1).clamp(min=1)).tolist())
    return pooled[0], pooled[1], paired_prompt_difference(per_prompt[0], per_prompt[1], samples=1)[1]


def sampled_kl(new_model: PreTrainedModel, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
               prompts: list[str], new_answers: list[str]) -> float:
    """KL(new || base) in nats per answer, estimated as mean(log p_new - log p_base) on answers sampled from new.

    Unbiased only for answers sampled at temperature 1 without top-k/top-p, as PPO samples;
    re-tokenising the stripped text adds a small bias. Both models must share `tokenizer`.
    """
    new_sums, _ = answer_logprobs(new_model, tokenizer, prompts, new_answers)
    base_sums, _ = answer_logprobs(base_model, tokenizer, prompts, new_answers)
    return float((new_sums - base_sums).mean())


# ----------------------------------------------------------------------------- guard rail


# standard errors by which the held-out reward must rise before the rise counts as a gain, not noise
# (one-sided 5%): a new policy is published because it is shown better, not because it is not shown
# worse. A "not worse" rule published a policy that lost 0.25 to the base policy on the annotator's
# own taste (issue 15); a noisy dip is a reason to keep serving the policy annotators already trust.
REWARD_GAIN_Z = 1.64
# fewer held-out prompts than this cannot show a gain: the standard error between prompts is unknown
MIN_HELD_OUT_PROMPTS = 3
# standard errors added to the held-out NLL rise before it is compared with its bound: fluency must be
# shown (one-sided 5%), not merely not refuted. A point estimate on 6 prompts x 8 answers read +0.16
# on a policy whose rise 96 other answers put at +0.60 (docs/ppo.md)
NLL_RISE_Z = 1.64


def paired_prompt_difference(new: list[float], old: list[float], samples: int) -> tuple[float, float]:
    """(mean, standard error) over prompts of a prompt's mean new score minus its mean old score.

    Scores come in blocks of `samples` per prompt, as `sample_completions` returns answers. Prompts,
    not answers, are the independent units: answers to one prompt share its difficulty. With a
    single prompt there is no spread to measure, and the standard error is 0.
    """
    if len(new) != len(old) or samples < 1 or len(new) % samples:
        raise ValueError(f"{len(new)} new and {len(old)} old scores with samples={samples}: pass "
                         "equally many of each, `samples` consecutive scores per prompt")
    if not new:
        raise ValueError("no scores to compare: pass at least one prompt's scores")
    diffs = [(sum(new[i:i + samples]) - sum(old[i:i + samples])) / samples for i in range(0, len(new), samples)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, 0.0
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


@dataclass(frozen=True)
class HeldOutComparison:
    kl: float  # KL(new || old), nats per answer, on answers the new policy sampled
    reward_new: float  # mean reward-model score of the new policy's answers
    reward_old: float  # ... and of the old policy's answers to the same prompts
    nll_rise: float  # NLL/token under the old policy: new answers minus the old policy's own answers
    reward_se: float = 0.0  # standard error of reward_new - reward_old, paired by prompt
    nll_rise_se: float = 0.0  # standard error of nll_rise, paired by prompt


def compare_on_held_out(new_model: PreTrainedModel, old_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        prompts: list[str], reward_fn: Callable[[list[str], list[str]], list[float]], samples: int,
                        max_new_tokens: int,
                        seed: int) -> HeldOutComparison:
    """Both policies answer the held-out prompts (same seed); KL, mean rewards (with the standard error of their
    difference) and NLL rise, for `should_publish`."""
    answers = {}
    for name, model in (("new", new_model), ("old", old_model)):
        torch.manual_seed(seed)
        answers[name] = [a for group in sample_completions(model, tokenizer, prompts, samples, max_new_tokens)
                         for a in group]
    repeated = [p for p in prompts for _ in range(samples)]
    rewards = {name: reward_fn(repeated, texts) for name, texts in answers.items()}
    nll_new, nll_old, rise_se = held_out_nll(old_model, tokenizer, repeated, answers["new"], answers["old"], samples)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return HeldOutComparison(
        kl=sampled_kl(new_model, old_model, tokenizer, repeated, answers["new"]),
        reward_new=mean(rewards["new"]),
        reward_old=mean(rewards["old"]),
        nll_rise=nll_new - nll_old,
        reward_se=paired_prompt_difference(rewards["new"], rewards["old"], samples)[1],
        nll_rise_se=rise_se,
    )


def should_publish(
    final_kl: float,
    max_kl: float,
    held_out_reward_new: float,
    held_out_reward_old: float,
    *,
    min_reward_gain: float = 0.0,
    reward_se: float = 0.0,
    rm_accuracy_low: float | None = None,
    min_rm_accuracy: float | None = None,
    nll_rise: float | None = None,
    max_nll_rise: float | None = None,
    nll_rise_se: float = 0.0,
) -> tuple[bool, str]:
    """Whether a trained policy may replace the serving one, and why (one line).

    Published only when it is shown better and stayed close and fluent. Refused when the policy
    drifted (final KL above `max_kl`); when its mean reward on held-out prompts did not rise above
    the old policy's by more than `min_reward_gain` plus noise (`REWARD_GAIN_Z` standard errors
    `reward_se` of the paired difference); when its answers may have lost fluency: their mean
    per-token NLL under the old policy rose, plus `NLL_RISE_Z` standard errors `nll_rise_se`, by
    more than `max_nll_rise` nats over the old policy's own answers (KL per answer misses this when
    the new answers are short); or when the reward model that judged it is not shown better than
    `min_rm_accuracy` on held-out pairs: `rm_accuracy_low`, the lower 95% Wilson bound of its
    accuracy there, is below it (the gain it sees may then be noise). The noise counts against the
    new policy in every check: a gain, fluency and a reward model better than chance must be shown,
    not merely not refuted. An unknown accuracy (None: no held-out pairs yet) does not block. A negative `min_reward_gain`
    lets a policy through whose reward fell that far (experiments only: it publishes non-gains).
    """
    if not math.isfinite(final_kl):
        return False, f"final KL is {final_kl}: the run diverged"
    if final_kl > max_kl:
        return False, f"final KL {final_kl:.3f} > PPO_MAX_KL {max_kl:.3f}: the policy drifted too far from the last one"
    gain, noise = held_out_reward_new - held_out_reward_old, REWARD_GAIN_Z * reward_se
    if gain - noise <= min_reward_gain:
        return False, (f"no gain shown: held-out reward {held_out_reward_old:.4f} -> {held_out_reward_new:.4f} "
                       f"(gain {gain:+.4f} - noise {noise:.4f} <= PPO_MIN_REWARD_GAIN {min_reward_gain:.4f})")
    if nll_rise is not None and max_nll_rise is not None and nll_rise + NLL_RISE_Z * nll_rise_se > max_nll_rise:
        fluency_noise = f" + noise {NLL_RISE_Z * nll_rise_se:.3f}" if nll_rise_se else ""
        return False, (f"answers lost fluency: their NLL under the serving policy rose {nll_rise:.3f}{fluency_noise} "
                       f"nats/token > PPO_MAX_NLL_RISE {max_nll_rise:.3f}")
    if rm_accuracy_low is not None and min_rm_accuracy is not None and rm_accuracy_low < min_rm_accuracy:
        return False, (f"reward model not shown better than chance: the lower 95% bound of its held-out accuracy, "
                       f"{rm_accuracy_low:.3f}, < PPO_MIN_RM_ACCURACY {min_rm_accuracy:.3f}")
    fluency_spread = f" (+-{nll_rise_se:.3f})" if nll_rise_se else ""
    fluency = "" if nll_rise is None else f", NLL rise {nll_rise:+.3f}{fluency_spread} nats/token"
    spread = f" (+-{reward_se:.4f})" if reward_se else ""
    return True, (f"KL {final_kl:.3f} <= {max_kl:.3f}, held-out reward {held_out_reward_old:.4f} -> "
                  f"{held_out_reward_new:.4f}{spread}{fluency}")
