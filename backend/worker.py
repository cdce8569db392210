"""The training worker: queued jobs in, candidates, reward-model versions and policy versions out.

Webhooks only record what happened and queue a job in the store; this process (started next to
gunicorn by `rlhf-backend serve`, or alone with `rlhf-backend worker`) claims jobs one at a time:
- generate:      prompts of new tasks -> K candidates each, written into the tasks in Label Studio
- sync:          a project's annotations in Label Studio -> a store equal to them (missed webhooks)
- fit_reward:    a project's pairs -> a new reward-model version of it if it holds up; may queue train_policy
- train_policy:  a project's reward model + prompts -> PPO/GRPO/RLOO/DPO -> guard rails -> its new policy version
- regenerate:    a project's tasks nobody annotated yet -> fresh candidates from its newest policy
Every job but secure_webhook belongs to one project, and touches only that project's loop.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch
from label_studio_sdk.core.api_error import ApiError

from backend import labelstudio
from backend.auth import basic_auth_header, webhook_auth_digest
from backend.evaluation import MIN_HELD_OUT_PROMPTS, compare_on_held_out, should_publish
from backend.dpo import DPOConfig
from backend.generation import generate_candidates, sample_completions
from backend.jobqueue import QueueUnavailable
from backend.labelconfig import RankingSchema, parse_ranking_schema
from backend.launch import launch, remove_stale_workdirs, workdir_prefix, write_spec
from backend.models import atomic_directory, load_causal_lm, resolve_encoder
from backend.predictions import rank_prediction
from backend.promotion import PROMOTION_FIELD, comparison_tasks, decide, tally
from backend.ppo import PPOConfig
from backend.registry import ModelRegistry
from backend.reward import is_held_out
from backend.reward_training import UpdatePolicy, fit_reward_version
from backend.rl import StepStats, improve_policy, normalised_to_candidates
from backend.settings import Settings, settings_env
from backend.store import HEARTBEAT_SECONDS, JOB_LEASE_SECONDS, LANES, MAX_JOB_ATTEMPTS, Job, Store, worker_name
from backend.supervisor import stop_on_termination
from backend.sync import sync_project

log = logging.getLogger(__name__)

MAX_HELD_OUT_PROMPTS = 24  # enough to see a real drop in reward
# answers per held-out prompt from each policy: with 6 prompts x 2, the NLL-rise guard read +0.39 on a
# policy whose NLL rise 48 other held-out answers put at +0.90; with 6 x 4, +0.43 where 96 read +0.65.
# 16, not 8: one answer's reward spreads by up to 14 on a prompt, and a real gain must clear the noise
# of each prompt's mean (docs/policy.md, "Through a real Label Studio")
HELD_OUT_SAMPLES = 16
# Workers run below the web processes' CPU priority: on 2 cores, a policy update and reward refits beside
# the web workers put webhook acks at p99 90 ms under 50 requests/s; niced, see docs/queue.md
WORKER_NICENESS = 10
QUEUE_RETRY_SECONDS = 5.0  # between tries to reach a job queue that is down
# a triggered update waits for the rankings to pause at most this many PPO_TRIGGER_QUIET_SECONDS: annotators who
# never pause for that long (quick pairwise clicks) still get an update within two minutes by default
QUIET_WAIT_LIMIT = 12


class CoreShare:
    """The train lane's torch threads beside a fast lane on the same machine: every core while the fast
    lane has nothing to do, its share while it has. On 2 cores a PPO step takes about 20 s on both and
    30-36 s on one, and candidates wait 4.9x longer when both lanes run 2 threads (docs/queue.md).
    OpenMP threads belong to the thread that sets them, so the training thread itself asks: at each
    step of an update and before its held-out check."""

    def __init__(self, store: Store, share: int, cores: int):
        self.store, self.share, self.cores = store, share, cores
        self.host = socket.gethostname()

    def adjust(self) -> int:
        wanted = self.share if self.store.lane_busy("fast", self.host) else self.cores
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        return wanted


class Worker:
    def __init__(self, settings: Settings, store: Store, registry: ModelRegistry | None = None,
                 cores: CoreShare | None = None):
        self.settings, self.store = settings, store
        self.registry = registry or ModelRegistry(settings, store)
        self.cores = cores  # None: the threads set at start stay
        self.update_policy = UpdatePolicy(replay_pairs=settings.reward_replay_pairs,
                                          full_refit_every=settings.reward_full_refit_every)
        self.finetune_base = resolve_encoder(settings.reward_model) if settings.reward_tier == "finetune" else None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = labelstudio.connect(self.settings.label_studio_url, self.settings.label_studio_api_key)
        return self._client

    def run(self, job: Job) -> None:
        handler = {
            "generate": self.generate,
            "regenerate": self.regenerate,
            "fit_reward": self.fit_reward,
            "train_policy": self.train_policy,
            "sync": self.sync,
            "secure_webhook": self.secure_webhook,
        }.get(job.kind)
        if handler is None:
            raise ValueError(f"unknown job kind {job.kind!r}")
        if job.project_id is not None and self.store.project_deleted(job.project_id):
            log.info("job %d (%s) skipped: project %d was deleted in Label Studio", job.id, job.kind, job.project_id)
            return
        try:
            handler(job)
        except ApiError as exc:
            if exc.status_code != 404 or job.project_id is None or not self.project_is_gone(job.project_id):
                raise
            stopped = self.store.delete_project(job.project_id)
            self.store.log_event("project_deleted", f"project {job.project_id} no longer exists in Label Studio: "
                                 f"{job.kind} job {job.id} and {stopped} queued job(s) stopped; its tasks and pairs "
                                 "stay exportable", project=job.project_id)

    def project_is_gone(self, project_id: int) -> bool:
        """Label Studio answers 404 for the project itself (not only for one of its tasks)."""
        try:
            self.client.projects.get(id=project_id)
        except ApiError as exc:
            return exc.status_code == 404
        return False

    # --- candidates ---
    def schema(self, project_id: int) -> RankingSchema:
        config = self.store.label_config(project_id)
        if config is None:
            config = self.client.projects.get(id=project_id).label_config
            self.store.save_project(project_id, config)
        return parse_ranking_schema(config)

    def generate(self, job: Job) -> None:
        """Write candidates into the job's tasks: new tasks, or (force) tasks a new policy should refresh."""
        schema = self.schema(job.project_id)
        tasks = self.store.tasks(job.payload["task_ids"])
        force = bool(job.payload.get("force"))
        todo = {tid: data for tid, data in tasks.items() if force or not data.get(schema.candidates_field)}
        if not todo:
            return
        policy = self.registry.policy(job.project_id)
        started = time.perf_counter()
        ids = sorted(todo)
        count = min(self.settings.num_candidates, schema.max_candidates or self.settings.num_candidates)
        candidates = generate_candidates(
            self.registry.generator(policy), [str(todo[t].get(schema.prompt_field, "")) for t in ids],
            num_candidates=count, max_new_tokens=self.settings.max_new_tokens,
            policy_version=policy.version, temperature=self.settings.temperature,
        )
        # before the first reward model there is no belief to pre-order by: Label Studio asks /predict later
        reward = self.registry.reward_model(job.project_id) if self.registry.reward_version(job.project_id) else None
        model_version = self.registry.model_version(job.project_id)
        for task_id, task_candidates in zip(ids, candidates):
            data = {**todo[task_id], **schema.candidate_data([c.as_list_item() for c in task_candidates])}
            labelstudio.write_task_data(self.client, task_id, data)
            # the task's old prediction ordered its old candidates: annotators get one for the text they see
            labelstudio.replace_predictions(self.client, task_id, reward and rank_prediction(
                {"data": data}, schema, reward, model_version))
            self.store.save_task(job.project_id, task_id, data, policy_version=policy.version)
        seconds = time.perf_counter() - started
        self.store.log_event("candidates", f"policy v{policy.version} wrote {count} candidates "
                             f"for {len(ids)} tasks in {seconds:.1f}s", project=job.project_id, tasks=ids,
                             policy_version=policy.version)

    def regenerate(self, job: Job) -> None:
        """After a new (or rolled-back) policy: fresh candidates for tasks nobody annotated; annotated tasks keep theirs."""
        current = self.registry.policy_version(job.project_id)
        versions = self.store.task_policy_versions(job.project_id)
        stale = [t for t in labelstudio.unannotated_task_ids(self.client, job.project_id)
                 if t in versions and versions[t] != current]  # != not <: a rollback serves an older version
        comparisons = {t for t, data in self.store.tasks(stale).items() if PROMOTION_FIELD in data}
        stale = [t for t in stale if t not in comparisons]  # blind comparisons keep the two answers they judge
        if stale:
            self.generate(Job(job.id, "generate", job.project_id, {"task_ids": stale, "force": True}))

    def sync(self, job: Job) -> None:
        """Catch up with annotations made while no backend listened (webhooks are never retried)."""
        before = self.store.pair_count(job.project_id)
        report = sync_project(self.store, self.client, job.project_id)
        self.store.log_event("sync", f"project {job.project_id} synced: {report}", project=job.project_id)
        if self.store.pair_count(job.project_id) != before or report.removed_annotations or report.removed_tasks:
            self.store.enqueue("fit_reward", job.project_id)

    def secure_webhook(self, job: Job, wait_seconds: float = 5.0) -> None:
        """Give the webhook Label Studio created for this backend the Authorization header it lacks.

        Label Studio sends /setup while it validates a new connection, just before it creates the
        webhook, so the webhook may take a moment to appear."""
        if self.settings.basic_auth is None:
            return
        header = basic_auth_header(self.settings.basic_auth)
        deadline = time.monotonic() + wait_seconds
        while True:
            hooks = labelstudio.backend_webhooks(self.client, job.project_id)
            if hooks or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for hook in hooks:
            if (hook.headers or {}).get("Authorization") != header:
                self.client.webhooks.update(id=hook.id, url=hook.url,
                                            headers={**(hook.headers or {}), "Authorization": header})
                self.store.log_event("webhook_secured", f"project {job.project_id}: webhook {hook.id} to {hook.url} "
                                     "now sends the backend's basic-auth credentials", project=job.project_id)
        if hooks:
            self.store.set_webhook_auth(job.project_id, webhook_auth_digest(self.settings.basic_auth))
        else:
            log.warning("project %s has no webhook to this backend: its events cannot arrive", job.project_id)

    # --- reward model ---
    def fit_reward(self, job: Job) -> None:
        """The project's pairs -> an incremental (or scheduled full) update, published only if it holds up on
        held-out prompts. A job without a project (queued before projects had their own loops) fits them all."""
        for project_id in [job.project_id] if job.project_id is not None else self.store.project_ids():
            self.update_reward(project_id)
            self.judge_promotion(project_id)
            self.queue_policy_update_if_due(project_id)

    def update_reward(self, project_id: int, full_refit: bool = False) -> None:
        # the fast lane and a policy update's full refit would write the same version directory
        with self.store.exclusive(f"reward-fit:{project_id}"):
            fit_reward_version(self.store, project_id, self.registry.reward_model(project_id),
                               partial(self.registry.reward_dir, project_id), self.update_policy,
                               finetune_base=self.finetune_base, seed=self.settings.seed, full_refit=full_refit)

    def refit_reward_fully(self, project_id: int) -> None:
        """Refit the reward heads from scratch if they were updated incrementally since their last full refit,
        or were fitted before the project's newest pairs arrived.

        Incremental updates follow annotators within a second but fit less well than a refit on every
        pair (HH: 0.626 vs 0.640; a Label Studio run's 108 held-out pairs: 0.69 vs 0.80), and PPO
        optimises whatever the reward model gets wrong, so it waits the few seconds for a full refit.
        The end of a burst of rankings may still wait in the fast lane's queue when the update starts.
        """
        latest = self.store.latest_version("reward", project_id)
        pairs = self.store.pair_count(project_id)
        # count and newest id both: an edited annotation replaces its pairs, keeping the count
        if pairs == 0 or (latest is not None and latest.pairs_seen == pairs
                          and latest.metrics.get("last_pair_id") == self.store.max_pair_id(project_id)
                          and not latest.metrics.get("updates_since_full_refit")):
            return  # nothing to fit, or a full refit (or the fine-tuned tier, always fitted afresh) on every pair
        self.update_reward(project_id, full_refit=True)

    def queue_policy_update_if_due(self, project_id: int) -> None:
        """Queue the project's policy update once enough new human signal has arrived in it and its reward
        model is worth training on."""
        new_pairs = self.store.pair_count(project_id, after_id=self.last_attempt_pair_id(project_id))
        if new_pairs < self.settings.ppo_trigger_pairs or self.store.has_active_job("train_policy", project_id):
            return
        if self.store.pending_promotion(project_id) is not None:  # the annotators judge the last update first
            return
        reward = self.store.latest_version("reward", project_id)
        low = reward.metrics.get("held_out_accuracy_low") if reward else None
        if low is not None and low < self.settings.ppo_min_rm_accuracy:
            # said once per reward model: every annotation asks again, and the answer changes only with a refit
            if (self.store.last_event_data("trigger", project_id) or {}).get("blocked_by_reward") != reward.version:
                self.store.log_event("trigger", f"{new_pairs} new pairs, but reward v{reward.version} is not shown "
                                     f"better than chance: {reward.metrics['held_out_accuracy']:.3f} right on "
                                     f"{reward.metrics['held_out_pairs']} held-out pairs, lower 95% bound {low:.3f} "
                                     f"< PPO_MIN_RM_ACCURACY {self.settings.ppo_min_rm_accuracy}: no policy update "
                                     "until more rankings arrive", project=project_id, blocked_by_reward=reward.version)
            return
        self.store.enqueue("train_policy", project_id)
        self.store.log_event("trigger", f"{new_pairs} new pairs since the last policy: {self.settings.rl_algorithm} "
                             "queued", project=project_id)

    def last_attempt_pair_id(self, project_id: int) -> int:
        """The newest pair of the project its last policy update saw, published or refused: the next one
        waits for PPO_TRIGGER_PAIRS pairs after it, so a refused run is not retried on the same signal."""
        latest = self.store.latest_version("policy", project_id)
        refused = self.store.last_event_data("policy_rejected", project_id) or {}
        return max(latest.metrics.get("last_pair_id", 0) if latest else 0, refused.get("last_pair_id", 0))

    # --- policy ---
    def wait_for_syncs(self, project_id: int, timeout: float = 600.0) -> None:
        """"Start training" queues a sync beside the update; the fast lane runs it, and the update trains
        on what it brings in, so it waits (a while: a sync reads every task of the project)."""
        deadline = time.monotonic() + timeout
        while self.store.has_active_job("sync", project_id) and time.monotonic() < deadline:
            time.sleep(0.5)

    def wait_for_rankings_to_pause(self, project_id: int) -> None:
        """Wait until no pair has arrived for PPO_TRIGGER_QUIET_SECONDS, at most QUIET_WAIT_LIMIT times as long.

        The trigger fires on the PPO_TRIGGER_PAIRS-th new pair, but pairs often come in bursts (an annotator
        ranking a queue of quick tasks, a sync, a scripted annotator): an update started at once would train
        on the first pairs of the burst, and the rest would wait minutes for the next update. Rankings at
        a human pace (one task every 10 s or more) barely delay it."""
        quiet = self.settings.ppo_trigger_quiet_seconds
        deadline = time.monotonic() + QUIET_WAIT_LIMIT * quiet
        while (last := self.store.last_pair_at(project_id)) is not None:
            idle, left = (datetime.now(UTC) - last).total_seconds(), deadline - time.monotonic()
            if idle >= quiet or left <= 0:
                return
            time.sleep(min(quiet - idle, left))

    def train_policy(self, job: Job) -> None:
        """The project's reward model + prompts -> RL -> its new policy version, published only past the guard rails."""
        settings, project_id = self.settings, job.project_id
        if project_id is None:
            raise ValueError("a policy update needs its project: queue train_policy with the Label Studio project id")
        pending = self.store.pending_promotion(project_id)
        if pending is not None:  # "Start training" while the annotators judge the last update
            self.store.log_event("trigger", f"no policy update yet: policy v{pending.version} awaits the annotators' "
                                 "verdict in its blind comparisons", project=project_id)
            return
        self.wait_for_syncs(project_id)
        self.wait_for_rankings_to_pause(project_id)
        last_pair_id = self.store.max_pair_id(project_id)
        serving = self.registry.policy(project_id)  # publishes v0 on first use
        shown = self.project_prompts(project_id)  # prompt -> candidate texts annotators saw
        train_prompts, held_out = split_held_out(list(shown))
        if not train_prompts:
            raise ValueError("no training prompts: import prompts into the project before training")
        if len(held_out) < MIN_HELD_OUT_PROMPTS:  # no gain could be shown: do not spend minutes training
            self.store.log_event("policy_rejected", f"no policy update: {len(held_out)} of {len(shown)} prompts are "
                                 f"held out, {MIN_HELD_OUT_PROMPTS} are needed to show a gain; import more prompts",
                                 project=project_id, last_pair_id=last_pair_id)
            return
        self.refit_reward_fully(project_id)
        reward = self.registry.reward_model(project_id)
        self.share_cores()
        model, tokenizer = load_causal_lm(serving.path)  # a private copy: training must not touch the serving model
        model.to(training_device(settings.train_device))
        launched = f" under accelerate launch ({settings.accelerate_config})" if settings.accelerate_config else ""
        self.store.log_event("ppo", f"{settings.rl_algorithm} started from policy v{serving.version} with reward "
                             f"v{reward.version} on {len(train_prompts)} prompts ({len(held_out)} held out){launched}",
                             project=project_id, algorithm=settings.rl_algorithm, from_version=serving.version,
                             reward_version=reward.version, planned_steps=planned_steps(settings))

        def on_step(stats: StepStats) -> None:
            self.share_cores()
            log_step(self.store, settings, project_id, stats)

        # train: the reward in units of the candidates annotators saw (centred per prompt, unit spread)
        candidates = {p: shown[p] for p in train_prompts if shown[p]}
        pairs = self.training_pairs(project_id, set(train_prompts)) if settings.rl_algorithm == "dpo" else None
        if settings.accelerate_config:
            trained, stats = self.launch_update(project_id, serving.path, reward.version, train_prompts, pairs,
                                                candidates)
            trained.to(model.device)
        else:
            trained, stats = improve_policy(settings.rl_algorithm, model, tokenizer, train_prompts,
                                            normalised_to_candidates(reward.score, candidates), ppo_config(settings),
                                            group_size=settings.rl_group_size, on_step=on_step, pairs=pairs,
                                            dpo_config=dpo_config(settings))
        metrics = {"algorithm": settings.rl_algorithm, "reward_version": reward.version, "steps": len(stats),
                   "final_train_kl": stats[-1].kl if stats else None, "last_pair_id": last_pair_id}
        if not stats:  # PPO undid its only update: the "new" policy is the serving one
            self.store.log_event("policy_rejected", f"policy not published, v{serving.version} keeps serving: "
                                 "the first update already drifted past PPO_STOP_KL / PPO_STOP_NLL_RISE and was "
                                 "undone", project=project_id, **metrics)
            return
        # guard rails: held-out prompts the update never saw judge whether the new policy may serve
        self.share_cores()
        self.store.log_event("evaluation", f"judging the update on {len(held_out)} held-out prompts x "
                             f"{HELD_OUT_SAMPLES} answers from each policy (the longest quiet stretch of an update)",
                             project=project_id, held_out_prompts=len(held_out), samples=HELD_OUT_SAMPLES)
        comparison = compare_on_held_out(trained, model, tokenizer, held_out, reward.score,
                                         samples=HELD_OUT_SAMPLES, max_new_tokens=settings.max_new_tokens,
                                         seed=settings.seed)
        judge = self.store.version("reward", project_id, reward.version)  # the reward model that scored both
        ok, reason = should_publish(comparison.kl, settings.ppo_max_kl, comparison.reward_new,
                                    comparison.reward_old, min_reward_gain=settings.ppo_min_reward_gain,
                                    reward_se=comparison.reward_se,
                                    rm_accuracy_low=judge.metrics.get("held_out_accuracy_low") if judge else None,
                                    min_rm_accuracy=settings.ppo_min_rm_accuracy,
                                    nll_rise=comparison.nll_rise, max_nll_rise=settings.ppo_max_nll_rise,
                                    nll_rise_se=comparison.nll_rise_se)
        metrics.update(asdict(comparison), guard=reason)
        if not ok:
            self.store.log_event("policy_rejected", f"policy not published, v{serving.version} keeps serving: "
                                 f"{reason}", project=project_id, **metrics)
            return
        # publish: saved to a staging directory and renamed, then recorded in the store
        version = self.store.next_version("policy", project_id)
        directory = self.registry.policy_dir(project_id, version)
        with atomic_directory(directory) as staging:  # a killed run never leaves a half-written policy
            trained.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        if settings.policy_promotion == "human":
            self.put_to_annotators(project_id, version, serving.version, trained, model, tokenizer, held_out,
                                   str(directory), metrics)
            return
        self.store.publish_version("policy", project_id, version, str(directory),
                                   pairs_seen=self.store.pair_count(project_id), metrics=metrics)
        self.store.log_event("policy", f"policy v{version} published after {len(stats)} steps ({metrics['guard']})",
                             project=project_id, version=version, **metrics)
        self.store.enqueue("regenerate", project_id)

    # --- human-gated promotion (backend/promotion.py) ---
    def put_to_annotators(self, project_id: int, version: int, serving_version: int, trained, serving_model,
                          tokenizer, held_out: list[str], directory: str, metrics: dict) -> None:
        """Record the new policy without serving it, and ask the annotators: blind comparisons of its
        answers against the serving policy's on held-out prompts, as tasks of the project."""
        answers = {}
        for offset, (name, model) in enumerate((("new", trained), ("serving", serving_model)), start=1):
            torch.manual_seed(self.settings.seed + offset)  # seeds of their own: not the held-out check's answers
            answers[name] = [group[0] for group in sample_completions(model, tokenizer, held_out, 1,
                                                                     self.settings.max_new_tokens)]
        # two equal answers can tell nobody anything: the comparisons are the prompts where they differ
        shown = [(p, new, old) for p, new, old in zip(held_out, answers["new"], answers["serving"])
                 if new.strip() != old.strip()][: self.settings.promotion_comparisons]
        if decide(0, 0, 0, outstanding=len(shown)).decision == "refuse":  # too few to ever be significant
            self.store.log_event("policy_rejected", f"policy not promoted, v{serving_version} keeps serving: its "
                                 f"answers differ from the serving policy's on {len(shown)} of {len(held_out)} held-out "
                                 "prompts, too few for annotators to show a preference", project=project_id,
                                 **metrics)
            return
        schema = self.schema(project_id)
        tasks = comparison_tasks(schema, [p for p, _, _ in shown], [n for _, n, _ in shown], [o for _, _, o in shown],
                                 candidate=version, serving=serving_version, seed=self.settings.seed + version)
        task_ids = labelstudio.import_tasks(self.client, project_id, tasks)
        for task_id, task in zip(task_ids, tasks):  # before the webhook: regeneration must leave them alone
            self.store.save_task(project_id, task_id, task["data"])
        self.store.publish_version("policy", project_id, version, directory, pairs_seen=self.store.pair_count(project_id),
                                   metrics={**metrics, "promotion": "pending", "comparison_tasks": task_ids},
                                   serving=False)
        self.store.log_event("promotion_pending", f"policy v{version} passed the automatic checks "
                             f"({metrics['guard']}); v{serving_version} keeps serving until annotators prefer v{version} "
                             f"in {len(task_ids)} blind comparisons, added as tasks", project=project_id,
                             version=version, comparison_tasks=task_ids,
                             **{k: metrics.get(k) for k in ("algorithm", "reward_new", "reward_old", "reward_se")})

    def judge_promotion(self, project_id: int) -> None:
        """Promote or refuse the project's pending policy once the annotators' comparisons decide it."""
        pending = self.store.pending_promotion(project_id)
        if pending is None:
            return
        task_ids = pending.metrics.get("comparison_tasks", [])
        verdict = tally(self.store.annotation_outcomes(project_id, task_ids), task_ids, pending.version)
        if verdict.decision == "wait":
            return
        numbers = {"wins": verdict.wins, "losses": verdict.losses, "ties": verdict.ties,
                   "p_value": verdict.p_value, "last_pair_id": pending.metrics.get("last_pair_id", 0)}
        self.store.settle_promotion(project_id, pending.version, verdict.decision == "promote", verdict=numbers)
        if verdict.decision == "promote":
            self.store.log_event("policy", f"policy v{pending.version} promoted: {verdict.describe()}",
                                 project=project_id, version=pending.version, **numbers)
            self.store.enqueue("regenerate", project_id)
        else:
            self.store.log_event("policy_rejected", f"policy v{pending.version} not promoted, the serving policy "
                                 f"keeps serving: {verdict.describe()}", project=project_id,
                                 version=pending.version, **numbers)

    def launch_update(self, project_id: int, policy_path: str, reward_version: int | None, prompts: list[str], pairs,
                      candidates: dict[str, list[str]]):
        """The training step of an update under `accelerate launch` (backend/launch.py): (trained policy, stats).
        It trains on `reward_version`, the reward model the update started with, not whichever the fast lane
        published since."""
        reward = self.store.version("reward", project_id, reward_version)
        if reward is None:
            raise ValueError(f"project {project_id} has no reward model yet: rank some tasks before a policy update")
        settings = self.settings
        remove_stale_workdirs(Path(settings.model_dir))
        with tempfile.TemporaryDirectory(prefix=workdir_prefix(), dir=settings.model_dir) as work:
            spec, out = Path(work) / "spec.json", Path(work) / "policy"
            write_spec(spec, project_id=project_id, policy_path=policy_path, algorithm=settings.rl_algorithm,
                       ppo_config=ppo_config(settings), dpo_config=dpo_config(settings),
                       group_size=settings.rl_group_size, prompts=prompts, pairs=pairs, candidates=candidates,
                       reward_path=reward.path, reward_version=reward.version, worker_pid=os.getpid())
            stats = launch(settings.accelerate_config, spec, out, settings_env(settings))
            trained, _ = load_causal_lm(str(out))
        return trained, stats

    def share_cores(self) -> None:
        if self.cores is not None:
            self.cores.adjust()

    def training_pairs(self, project_id: int, prompts: set[str]) -> tuple[list[str], list[str], list[str]]:
        """The project's pairs on training prompts, as (prompts, chosen, rejected): DPO's data."""
        rows = [r for r in self.store.pairs(project_id) if r.prompt in prompts]
        return [r.prompt for r in rows], [r.chosen for r in rows], [r.rejected for r in rows]

    def project_prompts(self, project_id: int) -> dict[str, list[str]]:
        """Every prompt of the project's tasks, with the candidate texts shown for it."""
        schema = self.schema(project_id)
        prompts: dict[str, list[str]] = {}
        for data in self.store.project_task_data(project_id):
            prompt = str(data.get(schema.prompt_field, ""))
            if prompt:
                bodies = [str(c.get("body", "")) for c in schema.candidate_items(data)]
                prompts.setdefault(prompt, []).extend(b for b in bodies if b)
        return prompts


def log_step(store: Store, settings: Settings, project_id: int, stats: StepStats) -> None:
    """One step of a policy update in the event log (the status page's curves and `train --wait`)."""
    kl = "n/a" if stats.kl is None else f"{stats.kl:.3f}"
    store.log_event("ppo_step", f"{settings.rl_algorithm} step {stats.step}: reward {stats.reward_mean:.3f}, KL {kl}, "
                    f"ETA {stats.eta_seconds:.0f}s", project=project_id,
                    planned_steps=planned_steps(settings) or stats.extra.get("max_steps"), **asdict(stats))


def split_held_out(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(prompts PPO trains on, held-out prompts that only judge the result); split by prompt hash."""
    train = [p for p in prompts if not is_held_out(p)]
    held_out = [p for p in prompts if is_held_out(p)][:MAX_HELD_OUT_PROMPTS]
    return (train or prompts), held_out  # a handful of prompts may all hash into the held-out split


def training_device(name: str) -> torch.device:
    """TRAIN_DEVICE as a torch device: "auto" is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("TRAIN_DEVICE=cuda but torch sees no GPU: set TRAIN_DEVICE=auto or cpu")
    return torch.device(name)


def ppo_config(settings: Settings) -> PPOConfig:
    """The RL step's config from the settings (trl's GRPO/RLOO read the shared fields)."""
    batch = settings.ppo_batch_size
    return PPOConfig(
        steps=settings.ppo_steps, batch_size=batch, mini_batch_size=batch // 2 if batch % 2 == 0 else batch,
        learning_rate=settings.ppo_learning_rate, warmup_steps=settings.ppo_warmup_steps,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, init_kl_coef=settings.ppo_init_kl_coef,
        fluency_coef=settings.ppo_fluency_coef, target_kl=settings.ppo_target_kl,
        stop_kl=settings.ppo_stop_kl, stop_nll_rise=settings.ppo_stop_nll_rise, lora_rank=settings.lora_rank,
        seed=settings.seed,
    )


def planned_steps(settings: Settings) -> int | None:
    """Rollouts an RL update runs unless a stop rule ends it early; DPO's optimiser steps are known only once
    it has read the pairs (its steps report them as `max_steps`)."""
    return None if settings.rl_algorithm == "dpo" else settings.ppo_steps


def dpo_config(settings: Settings) -> DPOConfig:
    """DPO's config from the settings: its own beta, epochs and learning rate; LoRA rank and seed shared."""
    return DPOConfig(beta=settings.dpo_beta, epochs=settings.dpo_epochs, learning_rate=settings.dpo_learning_rate,
                     lora_rank=settings.lora_rank, seed=settings.seed)


def run_worker(settings: Settings, stop: threading.Event | None = None, poll_seconds: float = 0.3,
               lane: str = "all", threads: int = 0) -> None:
    """Claim and run the jobs of `lane` (store.LANES) until `stop` is set (or SIGTERM/SIGINT arrives),
    with TORCH_THREADS torch threads if set, else `threads` (0: torch's default)."""
    if lane not in LANES:
        raise ValueError(f"lane {lane!r} is not one of {sorted(LANES)}: pass --lane fast, train or all")
    stop = stop_on_termination(stop or threading.Event())
    # the train lane beside a fast lane with its share of the cores (`worker --lane split`) takes them all
    # while the fast lane idles; TORCH_THREADS pins the threads instead
    share_cores = lane == "train" and not settings.torch_threads and 0 < threads < (os.cpu_count() or 1)
    threads = settings.torch_threads or threads
    if threads:
        torch.set_num_threads(threads)
    os.nice(WORKER_NICENESS)  # the web layer answers Label Studio first: its webhooks wait 1 s, never retried
    torch.manual_seed(settings.seed)
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    worker_id = worker_name(os.getpid())
    heartbeat = Heartbeat(store, worker_id)
    heartbeat.start()
    if "sync" in LANES[lane]:
        for project_id in store.project_ids():  # annotations made while no backend listened
            store.enqueue("sync", project_id)
    worker = Worker(settings, store, cores=CoreShare(store, threads, os.cpu_count()) if share_cores else None)
    log.info("worker %s ready (lane %s)", worker_id, lane)
    next_lease_check = 0.0
    try:
        while not stop.is_set():
            try:
                if time.monotonic() >= next_lease_check:
                    recover_jobs(store, lane)
                    next_lease_check = time.monotonic() + JOB_LEASE_SECONDS / 4
                job = store.claim_job(worker_id, lane)
            except QueueUnavailable as exc:  # the jobs wait in the store; so does this worker, for the queue
                log.warning("%s; trying again in %.0fs", exc, QUEUE_RETRY_SECONDS)
                stop.wait(QUEUE_RETRY_SECONDS)
                continue
            if job is None:
                stop.wait(poll_seconds)
                continue
            heartbeat.job_id = job.id
            run_job(worker, store, job)
            heartbeat.job_id = None
    finally:
        heartbeat.stop.set()
        store.retire_worker(worker_id)


def recover_jobs(store: Store, lane: str) -> None:
    """What any worker does now and then for all: retry the jobs of workers that died (their lease ran
    out), and announce again the queued jobs whose message the queue lost."""
    requeued = store.requeue_stale_jobs(JOB_LEASE_SECONDS, MAX_JOB_ATTEMPTS)
    if requeued:
        log.warning("%d job(s) whose worker stopped beating were requeued or failed", requeued)
    announced = store.announce_lost_jobs(lane)
    if announced:
        log.warning("%d queued job(s) had lost their message on the queue: announced again", announced)


def run_job(worker: Worker, store: Store, job: Job) -> None:
    """One job to done or failed: a failed job must not stop the loop; its reason is stored and logged."""
    started = time.perf_counter()
    try:
        worker.run(job)
    except Exception as exc:
        log.exception("job %d (%s) failed", job.id, job.kind)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        store.finish_job(job.id, error=reason)
        store.log_event("job_failed", f"{job.kind} job {job.id} failed: {reason}", project=job.project_id, job=job.id,
                        job_kind=job.kind)
        return
    store.finish_job(job.id)
    log.info("job %d (%s) done in %.1fs", job.id, job.kind, time.perf_counter() - started)
    if job.kind == "train_policy" and job.project_id is not None:
        # rankings that arrived while it ran found an update active and queued none; without this they would
        # wait for the next annotation. Not after a failure: a failed run records no pairs seen, so it would repeat
        worker.queue_policy_update_if_due(job.project_id)


class Heartbeat(threading.Thread):
    """Beats for the worker every HEARTBEAT_SECONDS, renewing the lease of the job it runs.

    A thread, so a PPO step that runs for minutes still beats: torch releases the GIL in its kernels."""

    def __init__(self, store: Store, worker_id: str):
        super().__init__(name="heartbeat", daemon=True)
        self.store, self.worker_id = store, worker_id
        self.job_id: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.store.beat(self.worker_id, self.job_id)
            except Exception:  # a locked or unreachable store: the next beat tries again
                log.warning("heartbeat of %s failed", self.worker_id, exc_info=True)
            self.stop.wait(HEARTBEAT_SECONDS)
