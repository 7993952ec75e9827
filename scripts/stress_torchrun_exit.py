"""Run a resumed two-rank `protonets embed` under torchrun many times and count the runs that
fail: the check for the teardown race of gloo's worker threads (a rank aborting with SIGABRT,
"terminate called without an active exception", after its work was done; see
`protonets.encoders.distributed.end_rank_process`).

Each run starts from the same state: one process killed after its first chunks (the resume of
`tests/test_distributed_embed.py`), then `torchrun --standalone --nproc-per-node 2` finishes it.
The race depends on timing and shows only now and then, more on a busy machine (the ranks'
threads waiting for a core): `--busy N` keeps N spinning processes running beside the runs. A
clean result is evidence, not proof; the cause is in `end_rank_process`'s docstring.

    python scripts/stress_torchrun_exit.py --runs 30 --busy 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "protonet-conv4-omniglot"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def make_images(root: Path) -> None:
    """12 small greyscale images in 3 class folders (4 chunks of 3 rows)."""
    rng = np.random.default_rng(0)
    for name in "abc":
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes beside the runs")
    args = parser.parse_args()
    spin = [sys.executable, "-c", "while True: pass"]
    busy = [subprocess.Popen(spin) for _ in range(args.busy)]
    try:
        failures = stress(args.runs)
    finally:
        for process in busy:
            process.kill()
    print(f"{failures} of {args.runs} runs failed")
    sys.exit(1 if failures else 0)


def stress(runs: int) -> int:
    """How many of `runs` resumed two-rank embeds failed."""
    from protonets.encoders.sharded import KILL_HOOK

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROTONETS_DIST_TIMEOUT": "120"}
    options = ["--chunk-size", "3", "--encoder", "conv4", "--checkpoint", str(CHECKPOINT)]
    options += ["--device", "cpu", "--workers", "0", "--batch-size", "4", "--quiet"]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_images(root / "data")
        embed = ["-m", "protonets", "embed", str(root / "data"), "--output"]
        killed = subprocess.run(
            [sys.executable, *embed, str(root / "base"), *options],
            env={**env, KILL_HOOK: "0:2"},
            capture_output=True,
            text=True,
        )
        if killed.returncode != 137:
            sys.exit(f"the killed run exited {killed.returncode}, not 137:\n{killed.stderr[-2000:]}")
        failures = 0
        for run in range(runs):
            out = root / f"run{run}"
            shutil.copytree(root / "base", out)
            command = [*TORCHRUN, *embed, str(out), *options]
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            aborted = "terminate called" in proc.stderr
            failures += proc.returncode != 0
            print(f"run {run + 1}: exit {proc.returncode}{' (rank aborted)' if aborted else ''}", flush=True)
            if proc.returncode != 0:
                print(proc.stderr[-1500:], flush=True)
            shutil.rmtree(out)
    return failures


if __name__ == "__main__":
    main()
