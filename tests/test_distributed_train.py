"""`protonets train` under torchrun: real processes (2 CPU ranks, gloo), one thread each.

tests/ddp_steps.py runs a few steps of a trainer under torchrun and saves each rank's parameters
and drawn episodes; the tests compare them with a single-process step on the same episodes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from protonets.cli import main
from protonets.encoders.distributed import World
from protonets.training import read_log
from protonets.training.checkpoint import load_state
from tests.conftest import write_class_folder
from tests.ddp_steps import make_trainer, synthetic, trained_parameters

HELPER = str(Path(__file__).with_name("ddp_steps.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun(*args, nproc: int = 2, launch: tuple = ("--standalone",), wait: bool = True):
    """`python -m torch.distributed.run` with `nproc` processes per node; the completed process."""
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", str(nproc)]
    command += [str(a) for a in args]
    if not wait:
        return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def ranks(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / f"rank{r}.safetensors") for r in range(2)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def params(saved: dict[str, torch.Tensor], prefix: str = "param.") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}


def reference_step(method: str, episodes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One single-process Adam step on the mean loss of `episodes`; the parameters after it."""
    trainer = make_trainer(method, 1, World(), meta_batch=len(episodes))
    m = trainer.method
    m.train(True)
    m.optimizer.zero_grad(set_to_none=True)
    if method == "maml":
        m.learner.meta_backward(m._tasks(torch.cat(episodes), None, trainer.config.shots))
    else:
        torch.stack([m.episode_loss(trainer.data.inputs(e))[0] for e in episodes]).mean().backward()
    m.optimizer.step()
    return {k: p.detach().clone() for k, p in trained_parameters(trainer).items()}


@pytest.mark.parametrize("method", ["protonet", "maml", "siamese", "relation"])
def test_ddp_step_is_a_step_on_the_mean_loss_and_ranks_stay_identical(method, tmp_path):
    """Two ranks, 3 steps: (a) after the first step, the parameters equal a single-process step
    on the mean loss of the two ranks' episodes (to 1e-6); (b) after 3 steps, the ranks' are equal."""
    run = torchrun(HELPER, method, 3, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = ranks(tmp_path)
    assert not torch.equal(first["episodes"], second["episodes"])  # each rank draws its own
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith(("first.", "param.")))
    start = make_trainer(method, 3, World(), meta_batch=2)
    assert max_difference(params(first), {k: p.detach() for k, p in trained_parameters(start).items()}) > 1e-4
    if method == "siamese":  # its pairs come from each rank's generator: no single-process twin
        return
    e0, e1 = first["episodes"][0], second["episodes"][0]
    both = reference_step(method, [e0, e1])
    assert max_difference(params(first, "first."), both) <= 1e-6
    assert max_difference(params(first, "first."), reference_step(method, [e0])) > 1e-5  # the mean mattered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"

    def node(rank: int) -> subprocess.Popen:
        launch = ("--nnodes", "2", "--node-rank", str(rank), "--rdzv-backend", "c10d")
        launch += ("--rdzv-endpoint", endpoint, "--rdzv-id", "test")
        return torchrun(HELPER, "protonet", 2, tmp_path, nproc=1, launch=launch, wait=False)

    launches = [node(0), node(1)]
    try:
        for launch in launches:
            output, _ = launch.communicate(timeout=300)
            assert launch.returncode == 0, output
    finally:  # a node that failed leaves the other waiting at the rendezvous
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
                launch.wait()
    first, second = ranks(tmp_path)
    assert not torch.equal(first["episodes"], second["episodes"])
    assert all(torch.equal(first[k], second[k]) for k in first if k.startswith("param."))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """6 classes of 5 small PNGs (4 for training, 2 for validation), class lists as split files."""
    return write_class_folder(tmp_path_factory.mktemp("folder"), synthetic(6, 5, 3).images, 6, 5, 4)


def train_args(root: Path, out: Path, episodes: int, *extra) -> list:
    return [
        "-m", "protonets", "train", "--method", "protonet", "--dataset", "folder", "--data", root,
        "--split", root / "train.txt", "--val-split", root / "val.txt", "--encoder", "conv4",
        "--ways", 2, "--shots", 1, "--queries", 2, "--val-ways", 2, "--val-shots", 1,
        "--val-queries", 2, "--val-episodes", 4, "--val-every", 2, "--episodes", episodes,
        "--device", "cpu", "--output", out, *extra,
    ]  # fmt: skip


def in_process(capsys, args: list) -> tuple[int, str]:
    """`protonets ...` in this process (one rank, no torchrun): (exit status, stderr)."""
    code = main([str(a) for a in args[2:]])  # without "-m protonets"
    return code, capsys.readouterr().err


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "protonets: error:" in line]


def test_train_command_under_torchrun_checkpoints_on_rank_0_and_resumes(folder, tmp_path, capsys):
    out = tmp_path / "run"
    run = torchrun(*train_args(folder, out, 4))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("trained conv4 for 4 episodes on 2 processes") == 1  # rank 0 alone
    assert [r["step"] for r in read_log(out)] == [0, 2, 4]  # one line per validation: one writer
    manifest, tensors = load_state(out)
    assert manifest["world_size"] == 2 and len(manifest["episode_rng_ranks"]) == 1
    assert "rank1.rng.sampler" in tensors and "rank1.rng.torch" in tensors
    assert json.loads((out / "manifest.json").read_text())["kind"] == "protonets.Checkpoint"

    run = torchrun(*train_args(folder, out, 6, "--resume"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert [r["step"] for r in read_log(out)] == [0, 2, 4, 6]
    assert load_state(out)[0]["step"] == 6

    code, err = in_process(capsys, train_args(folder, out, 8, "--resume", "--quiet"))
    assert code == 2 and error_lines(err) == [err.strip()]
    assert "trained by 2 process(es) and this launch has 1" in err


def test_resume_with_another_world_size_under_torchrun_is_one_error(folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = in_process(capsys, train_args(folder, out, 2, "--quiet"))
    assert code == 0, err
    run = torchrun(*train_args(folder, out, 4, "--resume", "--quiet"))
    assert run.returncode != 0
    assert "exitcode  : 2" in run.stderr  # torchrun reports the ranks' exit status 2
    lines = error_lines(run.stdout + run.stderr)
    assert len(lines) == 1 and "trained by 1 process(es) and this launch has 2" in lines[0], lines
    assert [r["step"] for r in read_log(out)] == [0, 2]  # nothing written


def test_cuda_asked_for_on_a_machine_without_cuda_is_one_line(folder, tmp_path):
    """The device is checked before the process group (NCCL) exists: one line, from rank 0."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = torchrun(*train_args(folder, tmp_path / "run", 2, "--device", "cuda", "--quiet"))
    assert run.returncode != 0
    assert "exitcode  : 2" in run.stderr and "NCCL" not in run.stderr
    assert "[rank0]" not in run.stderr and "[rank1]" not in run.stderr  # no worker traceback
    lines = error_lines(run.stdout + run.stderr)
    assert len(lines) == 1 and "--device cuda: no CUDA device is available" in lines[0], run.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_an_option_error_found_before_training_is_printed_once(folder, tmp_path):
    argv = train_args(folder, tmp_path / "run", 2, "--method", "siamese", "--init-checkpoint", tmp_path)
    run = torchrun(*argv)
    assert run.returncode != 0 and "exitcode  : 2" in run.stderr
    lines = error_lines(run.stdout + run.stderr)
    assert len(lines) == 1 and "--init-checkpoint starts the encoder" in lines[0], lines


def test_a_bad_collective_timeout_does_not_break_help():
    env = {**ENV, "PROTONETS_DIST_TIMEOUT": "30m"}
    run = subprocess.run(
        [sys.executable, "-m", "protonets", "train", "--help"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr[-2000:]


def test_nodes_with_different_data_refuse_to_train(folder, tmp_path):
    """Two "nodes" (two torchrun launches) given different copies of the dataset: one line naming
    rank 1, before any step; each node's ranks exit with status 2."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    image = other / "c0" / "0.png"
    Image.fromarray(255 - np.array(Image.open(image))).save(image)  # one image differs
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"

    def node(rank: int, data: Path) -> subprocess.Popen:
        launch = ("--nnodes", "2", "--node-rank", str(rank), "--rdzv-backend", "c10d")
        launch += ("--rdzv-endpoint", endpoint, "--rdzv-id", "data")
        argv = train_args(data, out, 2, "--quiet")
        return torchrun(*argv, nproc=1, launch=launch, wait=False)

    launches = [node(0, folder), node(1, other)]
    outputs = []
    try:
        for launch in launches:
            outputs.append(launch.communicate(timeout=300)[0])
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
                launch.wait()
    assert all(launch.returncode != 0 for launch in launches), outputs
    text = "".join(outputs)
    lines = error_lines(text)
    assert len(lines) == 1 and "rank 1 would train on other data" in lines[0], text[-3000:]
    assert "exitcode  : 2" in text
    assert not (out / "train_log.jsonl").exists()
