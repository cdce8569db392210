"""The loop's state, for people: the store and the registry in, one project's `LoopStatus` out.

What the status page (`/`), `GET /api/status` and `rlhf-backend status` show: the signal arriving
(pairs and annotations over time), the reward model's held-out accuracy per version, each policy
update's curves with the guard rails' verdict in words, the lanes' jobs with progress and ETA,
annotator agreement, and a few candidates of the serving policy beside the previous one's.
The pydantic models below are the API's schema (`LoopStatus.model_json_schema()`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

from backend.agreement import annotator_consistency, pairwise_agreement
from backend.labelconfig import LabelConfigError, parse_ranking_schema
from backend.registry import ModelRegistry
from backend.store import WORKER_ALIVE_SECONDS, Store, lane_of

MAX_TIMELINE_POINTS = 300  # a plot needs no more; a project with 100,000 pairs would send them all
MAX_POLICY_UPDATES = 10  # the newest ones
CANDIDATE_SAMPLES = 3  # tasks shown per policy version
UPDATE_EVENTS = ("ppo", "ppo_step", "policy", "policy_rejected", "job_failed")


class ProjectSummary(BaseModel):
    id: int
    model_version: str
    pairs: int


class SignalPoint(BaseModel):
    at: str  # ISO time the pair was stored
    pairs: int  # cumulative
    annotations: int  # cumulative, annotations that gave pairs


class RewardPoint(BaseModel):
    version: int
    held_out_accuracy: float | None
    accuracy_low: float | None  # Wilson interval of the accuracy
    accuracy_high: float | None
    held_out_pairs: int
    train_pairs: int
    retired: bool


class PolicyStep(BaseModel):
    step: int
    reward: float  # reward-model score normalised to the candidates annotators saw (per prompt)
    kl: float | None  # to the serving policy, nats per sequence
    nll_rise: float | None  # fluency: the base policy's NLL of the answers minus its NLL of its own, nats/token
    seconds: float


class PolicyUpdate(BaseModel):
    started_at: str
    algorithm: str | None
    from_version: int | None
    planned_steps: int | None
    steps: list[PolicyStep]
    outcome: Literal["running", "awaiting annotators", "published", "refused", "failed"]
    verdict: str  # the guard rails' reason in words, or the failure
    version: int | None  # the published version
    held_out_gain: float | None  # raw reward-model score on held-out prompts, new minus serving
    held_out_gain_se: float | None


class LaneJob(BaseModel):
    id: int
    kind: str
    lane: str
    project: int | None
    state: str
    attempts: int
    started_at: str | None
    progress: float | None  # 0..1, where the job reports steps
    eta_seconds: float | None


class AgreementStats(BaseModel):
    rate: float | None
    compared: int


class Agreement(BaseModel):
    pairwise: AgreementStats
    annotators: dict[str, AgreementStats]


class CandidateSample(BaseModel):
    prompt: str
    candidates: list[str]


class PolicyCandidates(BaseModel):
    version: int
    samples: list[CandidateSample]


class Workers(BaseModel):
    alive: int
    busy: int


class LoopStatus(BaseModel):
    generated_at: str
    projects: list[ProjectSummary]
    project: int | None  # the project shown; None before any project connected
    model_version: str | None
    pairs: int
    signal: list[SignalPoint]
    reward_versions: list[RewardPoint]
    policy_updates: list[PolicyUpdate]
    jobs: list[LaneJob]
    workers: Workers
    agreement: Agreement | None
    serving: PolicyCandidates | None
    previous: PolicyCandidates | None


def loop_status(store: Store, registry: ModelRegistry, project_id: int | None = None) -> LoopStatus:
    """The state of `project_id`'s loop (default: the first connected project)."""
    projects = project_summaries(store, registry)
    if project_id is None and projects:
        project_id = projects[0].id
    workers = store.live_workers(WORKER_ALIVE_SECONDS)
    status = dict(generated_at=_now().isoformat(), projects=projects, project=project_id,
                  jobs=lane_jobs(store), workers=Workers(alive=len(workers), busy=sum(w["job"] is not None for w in workers)))
    if project_id is None:
        return LoopStatus(**status, model_version=None, pairs=0, signal=[], reward_versions=[], policy_updates=[],
                          agreement=None, serving=None, previous=None)
    orders = store.pair_orders(project_id)
    serving, previous = candidates_of_versions(store, registry, project_id)
    return LoopStatus(
        **status, model_version=registry.model_version(project_id), pairs=len(orders),
        signal=signal_timeline(store, project_id), reward_versions=reward_points(store, project_id),
        policy_updates=policy_updates(store.events_of(project_id, UPDATE_EVENTS, limit=2000)),
        agreement=Agreement(pairwise=AgreementStats(**vars(pairwise_agreement(orders))),
                            annotators={str(who): AgreementStats(**vars(a))
                                        for who, a in annotator_consistency(orders).items()}),
        serving=serving, previous=previous,
    )


def project_summaries(store: Store, registry: ModelRegistry) -> list[ProjectSummary]:
    """Every connected project's loop in a line."""
    return [ProjectSummary(id=p, model_version=registry.model_version(p), pairs=store.pair_count(p))
            for p in store.project_ids()]


def signal_timeline(store: Store, project_id: int) -> list[SignalPoint]:
    """Cumulative pairs and annotations as they were stored, thinned to MAX_TIMELINE_POINTS."""
    points, seen = [], set()
    for count, (stamp, annotation) in enumerate(store.pair_times(project_id), start=1):
        seen.add(annotation)
        points.append(SignalPoint(at=stamp.isoformat(), pairs=count, annotations=len(seen)))
    if len(points) <= MAX_TIMELINE_POINTS:
        return points
    stride = len(points) / (MAX_TIMELINE_POINTS - 1)
    return [points[int(i * stride)] for i in range(MAX_TIMELINE_POINTS - 1)] + [points[-1]]


def reward_points(store: Store, project_id: int) -> list[RewardPoint]:
    return [RewardPoint(version=v.version, held_out_accuracy=v.metrics.get("held_out_accuracy"),
                        accuracy_low=v.metrics.get("held_out_accuracy_low"),
                        accuracy_high=v.metrics.get("held_out_accuracy_high"),
                        held_out_pairs=v.metrics.get("held_out_pairs", 0), train_pairs=v.metrics.get("train_pairs", 0),
                        retired=v.retired)
            for v in store.versions("reward", project_id)]


def policy_updates(events: list[dict]) -> list[PolicyUpdate]:
    """The project's policy-update events, oldest first, as updates: a start, its steps, an outcome.

    An update refused before training (too few held-out prompts) has an outcome and no steps."""
    updates: list[dict] = []
    open_update: dict | None = None
    for event in events:
        kind, data = event["kind"], event["data"] or {}
        if kind == "job_failed" and data.get("job_kind") != "train_policy":
            continue  # another job of the project failed
        if kind == "ppo" or (open_update is None and kind == "ppo_step"):
            open_update = _new_update(event)
            updates.append(open_update)
        if kind == "ppo_step":
            open_update["steps"].append(PolicyStep(
                step=data.get("step", len(open_update["steps"]) + 1), reward=data.get("reward_mean", 0.0),
                kl=data.get("kl"), nll_rise=(data.get("extra") or {}).get("nll_rise"), seconds=data.get("seconds", 0.0)))
        elif kind == "promotion_pending":  # passed the automatic checks; the annotators decide (promotion.py)
            update = open_update if open_update is not None else _new_update(event)
            if open_update is None:
                updates.append(update)
            update.update(outcome="awaiting annotators", verdict=event["message"], version=data.get("version"))
            _record_gain(update, data)
            open_update = None
        elif kind in ("policy", "policy_rejected", "job_failed"):
            # the annotators' verdict settles the update that waited for it
            waiting = next((u for u in reversed(updates) if u["outcome"] == "awaiting annotators"
                            and u["version"] == data.get("version")), None) if open_update is None else None
            update = open_update or waiting or _new_update(event)
            if open_update is None and waiting is None:
                updates.append(update)
            update.update(outcome={"policy": "published", "policy_rejected": "refused"}.get(kind, "failed"),
                          verdict=data.get("guard", event["message"]) if kind == "policy" else event["message"],
                          version=data.get("version") if kind == "policy" else None,
                          algorithm=data.get("algorithm", update["algorithm"]))
            _record_gain(update, data)
            open_update = None
    return [PolicyUpdate(**u) for u in updates[-MAX_POLICY_UPDATES:]]


def _record_gain(update: dict, data: dict) -> None:
    if data.get("reward_new") is not None and data.get("reward_old") is not None:
        update.update(held_out_gain=data["reward_new"] - data["reward_old"], held_out_gain_se=data.get("reward_se"))


def _new_update(event: dict) -> dict:
    data = event["data"] or {}
    return dict(started_at=event["at"], algorithm=data.get("algorithm"), from_version=data.get("from_version"),
                planned_steps=data.get("planned_steps"), steps=[], outcome="running", verdict="running",
                version=None, held_out_gain=None, held_out_gain_se=None)


def lane_jobs(store: Store) -> list[LaneJob]:
    """Queued and running jobs by lane; a running policy update reports its progress and time left."""
    jobs = []
    for job in store.active_jobs():
        progress = eta = None
        if job["kind"] == "train_policy" and job["state"] == "running" and job["project"] is not None:
            progress, eta = update_progress(store.events_of(job["project"], ("ppo", "ppo_step"), limit=1))
        jobs.append(LaneJob(**job, lane=lane_of(job["kind"]), progress=progress, eta_seconds=eta))
    return jobs


def update_progress(newest: list[dict]) -> tuple[float | None, float | None]:
    """(fraction of planned steps done, seconds left) from a running update's newest step event."""
    if not newest or newest[-1]["kind"] != "ppo_step":
        return 0.0, None
    data = newest[-1]["data"] or {}
    planned = data.get("planned_steps")
    since = (_now() - datetime.fromisoformat(newest[-1]["at"])).total_seconds()
    eta = max(0.0, float(data.get("eta_seconds", 0.0)) - since)
    return (min(1.0, data.get("step", 0) / planned) if planned else None), eta


def candidates_of_versions(store: Store, registry: ModelRegistry, project_id: int
                           ) -> tuple[PolicyCandidates | None, PolicyCandidates | None]:
    """A few tasks' candidates from the serving policy, and from the newest earlier version that wrote any."""
    config = store.label_config(project_id)
    try:
        schema = parse_ranking_schema(config) if config else None
    except LabelConfigError:
        schema = None
    if schema is None:
        return None, None
    serving = registry.policy_version(project_id)

    def samples(version: int) -> PolicyCandidates | None:
        tasks = store.task_data_of_version(project_id, version, CANDIDATE_SAMPLES)
        if not tasks:
            return None
        return PolicyCandidates(version=version, samples=[CandidateSample(
            prompt=str(t.get(schema.prompt_field, "")),
            candidates=[str(c.get("body", "")) for c in schema.candidate_items(t)]) for t in tasks])

    earlier = (samples(v.version) for v in reversed(store.versions("policy", project_id)) if v.version < serving)
    return samples(serving), next((s for s in earlier if s is not None), None)


def _now() -> datetime:
    return datetime.now(UTC)
