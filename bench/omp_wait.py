"""A training worker's step beside other busy processes: OpenMP's default wait policy against PASSIVE.

In:  the default policy; a worker-like child process (niced as the worker is, torch threads = every core) that
     times one unit of work: sampling candidates and one forward and backward pass; 0 or one busy process per core
     beside it (nice 0, one torch thread each, as a bench or another job on the same machine).
Out: a markdown table: per load and wait policy, the median seconds of the unit (of the units a child finished
     before the timeout), and PASSIVE's time over the default's in the same run.

Why: libgomp's threads spin for a while at every barrier before they sleep (OMP_WAIT_POLICY unset; ACTIVE spins
without end). A niced worker whose threads share their cores with busier processes then spends its small share
spinning while the thread it waits for is not running. PASSIVE threads sleep at once.

Run: `.venv/bin/python bench/omp_wait.py [--repeats 3] [--timeout 240]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = ("unset", "PASSIVE")  # unset: libgomp's default
HOG = "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a @ a"


def child(repeats: int) -> None:
    """The worker's side: time `repeats` units after one warm-up, print the seconds as JSON."""
    import torch

    from backend.generation import sample_completions
    from backend.models import DEFAULT_POLICY, load_causal_lm, resolve_policy
    from backend.worker import WORKER_NICENESS

    os.nice(WORKER_NICENESS)
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_causal_lm(resolve_policy(DEFAULT_POLICY, ROOT / ".cache"))
    batch = torch.randint(0, 1000, (4, 96))

    def unit() -> float:
        started = time.perf_counter()
        sample_completions(model, tokenizer, ["Why is the sky blue?", "Name a fruit."], 2, 24)
        model(input_ids=batch, labels=batch).loss.backward()
        return time.perf_counter() - started

    unit()
    for _ in range(repeats):
        print(json.dumps(unit()), flush=True)  # line by line: a child stopped at the timeout still tells its units


def timed(policy: str, repeats: int, timeout: float) -> tuple[float | None, bool]:
    """The median seconds of the units a child under `policy` finished (None: not one), and whether it
    ran past `timeout`."""
    env = {name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    try:
        out, cut = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats)], env=env,
                                  capture_output=True, text=True, timeout=timeout, check=True).stdout, False
    except subprocess.TimeoutExpired as stopped:
        out, cut = stopped.stdout or "", True
        out = out.decode() if isinstance(out, bytes) else out
    units = [float(line) for line in out.split()]
    return (statistics.median(units) if units else None), cut


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240, help="seconds a child may take, loading included")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.repeats)
    cores = os.cpu_count() or 1
    print("| busy processes beside the worker | OMP_WAIT_POLICY unset | PASSIVE | PASSIVE / unset |\n|---|---|---|---|")
    for busy in (0, cores):
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(busy)]
        try:
            seconds = {policy: timed(policy, args.repeats, args.timeout) for policy in POLICIES}
        finally:
            for hog in hogs:
                hog.kill()
        cells = [cell(*result, args.timeout) for result in seconds.values()]
        unset, passive = seconds["unset"][0], seconds["PASSIVE"][0]
        ratio = f"{passive / unset:.2f}" if unset and passive else "n/a"
        print(f"| {busy} | {' | '.join(cells)} | {ratio} |", flush=True)
    print(f"\nMachine: {os.cpu_count()} cores, {sys.platform}; the worker at nice {worker_niceness()}, "
          f"{cores} torch threads; median of {args.repeats} units after a warm-up.")


def cell(median: float | None, cut: bool, timeout: float) -> str:
    if median is None:
        return f"no unit in {timeout:.0f} s"
    return f"{median:.1f} s" + (f" (cut at {timeout:.0f} s)" if cut else "")


def worker_niceness() -> int:
    from backend.worker import WORKER_NICENESS

    return WORKER_NICENESS


if __name__ == "__main__":
    main()
