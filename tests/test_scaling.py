"""Growing past one CPU: the shipped accelerate configs load and launch, and the GPU paths (marker
`gpu`, skipped where no CUDA GPU is visible) generate with vLLM and train on the GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {  # file -> (accelerate's distributed type, mixed precision, DeepSpeed ZeRO stage)
    "cpu.yaml": ("NO", "no", None),
    "single_gpu.yaml": ("NO", "bf16", None),
    "multi_gpu.yaml": ("MULTI_GPU", "bf16", None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", "bf16", 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", "bf16", 3),
}


def test_every_shipped_accelerate_config_loads_as_the_setup_its_name_says():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, (distributed, precision, zero_stage) in EXPECTED.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert (config.distributed_type.value, str(config.mixed_precision)) == (distributed, precision), name
        assert (config.deepspeed_config or {}).get("zero_stage") == zero_stage, name


def test_accelerate_launch_runs_a_process_with_the_cpu_config(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("from accelerate import Accelerator\n"
                      "a = Accelerator()\n"
                      "print('probe', a.device.type, a.num_processes, a.state.distributed_type.value)\n")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(CONFIGS / "cpu.yaml"), str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probe cpu 1 NO" in result.stdout


def test_a_failed_launch_reports_the_launched_process_error_not_accelerates_wrapper(tmp_path):
    from backend.launch import launch

    spec = tmp_path / "spec.json"
    spec.write_text("{}")  # no worker_pid: backend.launch fails at once
    with pytest.raises(RuntimeError, match="exited with 1: .*KeyError: 'worker_pid'") as failure:
        launch(str(CONFIGS / "cpu.yaml"), spec, tmp_path / "out", {})
    assert "CalledProcessError" not in str(failure.value)


def test_a_launched_process_exits_once_the_worker_that_launched_it_is_killed():
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands in for the worker
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                              "from backend.launch import exit_when_gone\n"
                              f"exit_when_gone({worker.pid}, interval=0.1)\n"
                              "time.sleep(120)\n"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # it trains on while the worker lives
            child.wait(timeout=3)
        worker.kill()  # SIGKILL, and not reaped yet: a zombie counts as gone
        assert child.wait(timeout=30) == 1
        assert f"the worker (pid {worker.pid}) that launched this update is gone" in child.stderr.read()
    finally:
        for process in (worker, child):
            process.kill()
            process.wait()


def test_a_launch_directory_is_removed_once_its_worker_is_gone_and_kept_while_it_lives(tmp_path):
    from backend.launch import remove_stale_workdirs, workdir_prefix

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"{workdir_prefix(gone.pid)}abc"
    live = tmp_path / f"{workdir_prefix()}def"
    other_machine = tmp_path / f".launch-elsewhere-{gone.pid}-ghi"  # its pid means nothing here
    for workdir in (stale, live, other_machine):
        (workdir / "policy").mkdir(parents=True)
    assert remove_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other_machine.exists()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the vllm extra)")
def test_vllm_writes_k_candidates_per_prompt_on_the_gpu(tiny_policy):
    from backend.generation import VLLMGenerator, generate_candidates
    from backend.models import load_causal_lm

    _, tokenizer = load_causal_lm(str(tiny_policy))
    engine = VLLMGenerator(str(tiny_policy), tokenizer)
    out = generate_candidates(engine, ["Hi", "What is 2+2?", "Name a fruit."], num_candidates=4, max_new_tokens=8,
                              policy_version=0)
    assert [len(c) for c in out] == [4, 4, 4] and len({c.id for cands in out for c in cands}) == 12


@pytest.mark.gpu
@needs_gpu
def test_a_ppo_update_runs_on_the_gpu(tiny_env):
    from test_worker import job, make_worker, seed_project

    worker = make_worker(tiny_env, train_device="cuda", ppo_steps=2, ppo_batch_size=4)
    seed_project(worker.store, annotated=30)
    worker.fit_reward(job("fit_reward"))
    worker.train_policy(job("train_policy"))
    steps = [e for e in worker.store.events(limit=50) if e["kind"] == "ppo_step"]
    assert steps and any(e["kind"] in ("policy", "policy_rejected") for e in worker.store.events(limit=50))


@pytest.mark.parametrize("algorithm", ["dpo", "ppo"])
def test_a_policy_update_under_accelerate_launch_is_judged_and_published_by_the_worker(tiny_env, algorithm):
    from test_worker import job, make_worker, seed_project

    worker = make_worker(tiny_env, accelerate_config=str(CONFIGS / "cpu.yaml"), rl_algorithm=algorithm, dpo_epochs=2)
    seed_project(worker.store, annotated=20)
    worker.fit_reward(job("fit_reward"))
    worker.train_policy(job("train_policy"))
    store = worker.store
    assert "under accelerate launch" in store.events_of(1, ["ppo"], limit=1)[0]["message"]
    steps = store.events_of(1, ["ppo_step"], limit=20)  # logged by the launched process
    assert steps and all(e["data"]["planned_steps"] for e in steps)
    latest = store.latest_version("policy", 1)
    assert latest.version == 1 and latest.metrics["algorithm"] == algorithm and latest.metrics["steps"] == len(steps)
    assert Path(latest.path, "config.json").exists()
    assert not list(Path(tiny_env["MODEL_DIR"]).glob(".launch-*"))  # its working directory is gone


def test_an_accelerate_config_that_is_not_a_file_is_refused_with_the_fix(tiny_env):
    from backend.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="ACCELERATE_CONFIG='nope.yaml'.*configs/accelerate"):
        load_settings({**tiny_env, "ACCELERATE_CONFIG": "nope.yaml"})
