"""Policy updates under `accelerate launch`: one update's inputs in (a JSON spec), its trained policy out.

With ACCELERATE_CONFIG set (configs/accelerate/), the worker writes what the update needs to a spec:
the serving policy's files, the algorithm and its config, the training prompts, pairs and the
candidates annotators saw, and the reward model's files; then it runs
`accelerate launch --config_file ACCELERATE_CONFIG -m backend.launch SPEC OUT` and waits. Every process
of the launch trains: trl's trainers (DPO, GRPO, RLOO) share the work across the GPUs with DDP or
DeepSpeed as the config says; the written-out PPO runs in one process. The main process logs each step
to the store and writes the trained policy and its step statistics to OUT; the worker then judges and
publishes it exactly as an update run in its own process (backend/worker.py). Each process watches
the worker that launched it and exits when the worker is gone (`exit_when_gone`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from backend.dpo import DPOConfig
from backend.ppo import PPOConfig
from backend.rl import StepStats

STATS_FILE = "step_stats.json"


def workdir_prefix(pid: int | None = None) -> str:
    """The name a launch's working directory in MODEL_DIR starts with: the machine and the worker's pid,
    so a later worker can tell a launch whose worker is gone (MODEL_DIR may be shared between machines)."""
    return f".launch-{socket.gethostname()}-{os.getpid() if pid is None else pid}-"


def remove_stale_workdirs(model_dir: Path) -> list[Path]:
    """Remove the launch working directories in `model_dir` left by workers of this machine that are gone.

    A worker killed with SIGKILL cannot clean up; what it leaves holds a spec and perhaps a whole
    trained policy, hundreds of MB a time."""
    own_machine = f".launch-{socket.gethostname()}-"
    removed = []
    for workdir in model_dir.glob(f"{own_machine}*"):
        pid = workdir.name[len(own_machine):].split("-", 1)[0]
        if workdir.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(workdir)
    return removed


def write_spec(path: Path, *, project_id: int, policy_path: str, algorithm: str, ppo_config: PPOConfig,
               dpo_config: DPOConfig, group_size: int, prompts: list[str], pairs, candidates: dict[str, list[str]],
               reward_path: str, reward_version: int | None, worker_pid: int) -> None:
    path.write_text(json.dumps({
        "project_id": project_id, "policy_path": policy_path, "algorithm": algorithm,
        "ppo_config": asdict(ppo_config), "dpo_config": asdict(dpo_config), "group_size": group_size,
        "prompts": prompts, "pairs": [list(p) for p in pairs] if pairs else None, "candidates": candidates,
        "reward_path": reward_path, "reward_version": reward_version, "worker_pid": worker_pid,
    }))


def launch(config_file: str, spec: Path, out: Path, env: dict[str, str]) -> list[StepStats]:
    """Run the update of `spec` under accelerate with `config_file`; the trained policy is left in `out`."""
    # --quiet: a failure ends stderr with the launched process's own error, not accelerate's wrapper traceback
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", config_file,
               "-m", "backend.launch", str(spec), str(out)]
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the policy update under `accelerate launch --config_file {config_file}` exited with "
                           f"{result.returncode}: {tail}"[:2000])
    return [StepStats(**s) for s in json.loads((out / STATS_FILE).read_text())]


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no procfs (macOS): kill(0) has the last word
        return True
    return state not in ("Z", "X")


def exit_when_gone(pid: int, interval: float = 1.0) -> threading.Thread:
    """Exit this process once process `pid` is gone, checking every `interval` seconds.

    A SIGKILLed worker cannot stop what it launched; without this its update trained on as an orphan,
    logging steps and taking the cores from the update its requeued job starts again. When this
    process exits, `accelerate launch` (its parent) sees it fail and exits too.
    """
    def watch() -> None:
        while process_alive(pid):
            time.sleep(interval)
        print(f"backend.launch: the worker (pid {pid}) that launched this update is gone; stopping",
              file=sys.stderr, flush=True)
        os._exit(1)  # from a thread: sys.exit would end only the thread

    watcher = threading.Thread(target=watch, name=f"watch-worker-{pid}", daemon=True)
    watcher.start()
    return watcher


def main(spec_path: str, out_dir: str) -> None:
    """One process of the launch: train; the main process logs, saves the policy and its statistics."""
    spec = json.loads(Path(spec_path).read_text())
    exit_when_gone(spec["worker_pid"])  # before the imports and the model load: seconds a killed worker's child lives on
    import torch
    from accelerate import PartialState

    from backend.models import load_causal_lm
    from backend.registry import ModelRegistry
    from backend.reward import load_reward_model
    from backend.rl import improve_policy, normalised_to_candidates
    from backend.settings import load_settings
    from backend.store import Store
    from backend.worker import log_step, training_device

    state = PartialState()
    if spec["algorithm"] in ("ppo", "best_of_k") and state.num_processes > 1:
        raise SystemExit(f"RL_ALGORITHM={spec['algorithm']} trains in one process, the config starts "
                         f"{state.num_processes}: use RL_ALGORITHM=dpo, grpo or rloo (trl's trainers) with a "
                         "multi-process config")
    settings = load_settings()
    store = Store(settings.store_url, settings.redis_url)
    torch.manual_seed(settings.seed)
    model, tokenizer = load_causal_lm(spec["policy_path"])
    model.to(state.device if state.num_processes > 1 else training_device(settings.train_device))
    encoder = ModelRegistry(settings, store).encoder()
    reward = load_reward_model(Path(spec["reward_path"]), encoder, version=spec["reward_version"])

    def on_step(stats: StepStats) -> None:
        if state.is_main_process:
            log_step(store, settings, spec["project_id"], stats)

    trained, stats = improve_policy(
        spec["algorithm"], model, tokenizer, spec["prompts"], normalised_to_candidates(reward.score, spec["candidates"]),
        PPOConfig(**spec["ppo_config"]), group_size=spec["group_size"], on_step=on_step,
        pairs=tuple(spec["pairs"]) if spec["pairs"] else None, dpo_config=DPOConfig(**spec["dpo_config"]))
    if state.is_main_process:
        out = Path(out_dir)
        trained.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / STATS_FILE).write_text(json.dumps([asdict(s) for s in stats]))
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
