"""Start-up paid once: time `protonets` commands against a bare `python -c "import torch"`, side by side.

Each round runs, in turn: `import torch`, `protonets --help`, `protonets classify --help`,
`protonets eval --bogus` (an argument error) and a warm `protonets eval` of 600 episodes (every
embedding cached, so no model is built). Medians over the rounds and their ratios to `import torch`
are printed as a Markdown table; absolute times on a shared machine are noise, the ratios are the
result. Issue 15 asks for: help and argument errors well under `import torch` (they import no
torch), and a warm eval at most 2x `import torch`.

    python scripts/bench_startup.py                       # Omniglot test split, conv4 checkpoint
    python scripts/bench_startup.py --rounds 5 --cache-dir /tmp/cache

The first eval run fills the cache when it is empty (minutes); it is reported apart, not timed
in the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PROTONETS_DATA", REPO.parent / "shared" / "data"))


def timed(argv: list[str]) -> float:
    """Wall seconds of one run (its output discarded); a failing run stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 2):
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="omniglot")
    parser.add_argument("--data", default=str(DATA / "omniglot"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--encoder", default="conv4")
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "protonet-conv4-omniglot"))
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: the user's)")
    args = parser.parse_args()

    py = sys.executable
    cmd = [py, "-m", "protonets"]
    evaluate = [
        *cmd,
        "eval",
        "--dataset", args.dataset,
        "--data", args.data,
        "--split", args.split,
        "--encoder", args.encoder,
        "--checkpoint", args.checkpoint,
        "--ways", "5",
        "--shots", "1",
        "--episodes", str(args.episodes),
        "--quiet",
    ]  # fmt: skip
    if args.cache_dir:
        evaluate += ["--cache-dir", args.cache_dir]
    runs = {
        'python -c "import torch"': [py, "-c", "import torch"],
        "protonets --help": [*cmd, "--help"],
        "protonets classify --help": [*cmd, "classify", "--help"],
        "protonets eval --bogus": [*cmd, "eval", "--bogus"],
        f"protonets eval (warm, {args.episodes} episodes)": evaluate,
    }
    first = timed(evaluate)  # fills the embedding cache and the fingerprint cache if empty
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, argv in runs.items():  # interleaved: load on the machine hits all alike
            times[name].append(timed(argv))
    base = statistics.median(times['python -c "import torch"'])
    print(f"first eval run (fills the cache if empty): {first:.2f} s; {args.rounds} rounds, medians:\n")
    print("| command | median (s) | × import torch |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
