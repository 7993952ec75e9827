"""Runs launched by `torchrun`: rank and world size, each rank's share of a list, errors shared.

Only PyTorch's own runtime (`torch.distributed`: gloo on CPU, NCCL on CUDA); no cluster code of
ours. A command calls `start_world(device name)` once (or `init_world(device)` for a checked
device): without torchrun's environment it returns the single-process `World()` and nothing else
changes. `rank_device` is the one place that maps a rank to its device (GPU LOCAL_RANK).
Bad input found on one rank must stop every rank with that rank's one-line error, instead of
leaving the others waiting in a collective: `all_ranks_agree` wraps each checking phase (every
rank reaches it, success or not) and re-raises the first failing rank's error everywhere,
printed by rank 0 only (`RankError.quiet`). A rank that crashes outright is stopped together
with its peers by torchrun itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import UserInputError

#: How long a collective may wait for a peer before the run fails, unless PROTONETS_DIST_TIMEOUT
#: (seconds) says otherwise: long, because some phases run on rank 0 alone while the others wait
#: (assembling a 10M-row embedding set, merging an index). A peer that died is noticed sooner:
#: torchrun stops every rank when one exits.
TIMEOUT_ENV = "PROTONETS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 6 * 3600
#: How long a rank whose own checks failed waits for its peers to share its error.
_PROBLEM_TIMEOUT_S = 120
#: Whether this process started a process group (`init_world`), left or not: its gloo threads
#: may outlive it (see `end_rank_process`).
_joined = False


class RankError(UserInputError):
    """A user error found on one rank, raised on every rank; only rank 0 prints it (`quiet`)."""

    def __init__(self, message: str, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class World:
    """This process's place in a run: `rank` of `size` processes (`size` 1 outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that shows progress, validates, logs and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> range:
        """This rank's contiguous block of `range(n)`; the blocks in rank order cover it once."""
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)


def launched_by_torchrun() -> bool:
    """True inside a `torchrun` launch of more than one process (WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def collective_timeout() -> timedelta:
    """PROTONETS_DIST_TIMEOUT (seconds, default DEFAULT_TIMEOUT_S); read when a world starts, so
    a bad value is a one-line error of the command that uses it, not of every import."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise UserInputError(
            f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds, e.g. "
            f"{TIMEOUT_ENV}={DEFAULT_TIMEOUT_S}"
        )
    return timedelta(seconds=seconds)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_world(device: str = "cpu", *, timeout: timedelta | None = None) -> World:
    """Join the process group torchrun set up (gloo for CPU, NCCL for CUDA); `World()` alone.

    `device` must be checked already (see `start_world`, which also shares a bad one's error).
    """
    if not launched_by_torchrun():
        return World()
    import torch.distributed as dist

    global _joined
    if not dist.is_initialized():
        timeout = timeout or collective_timeout()
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timeout)
        _joined = True
    return World(dist.get_rank(), dist.get_world_size(), _local_rank())


def rank_device(name: str) -> str:
    """This process's device for `--device name`, checked (a `UserInputError` as `resolve_device`
    gives). Under torchrun, 'cuda' (and 'auto' on a machine with CUDA) is this node's GPU
    LOCAL_RANK modulo the GPUs it has, made the current device (NCCL's collectives use it);
    'cuda:N' is refused when several ranks share the node (they would all use GPU N)."""
    from .device import resolve_device

    device = resolve_device(name)
    if not (launched_by_torchrun() and device.startswith("cuda")):
        return device
    import torch

    if device == "cuda":
        device = f"cuda:{_local_rank() % torch.cuda.device_count()}"
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise UserInputError(
            f"--device {name} would put every rank of this node on one GPU; use --device cuda "
            "(rank LOCAL_RANK takes GPU LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    torch.cuda.set_device(device)
    return device


def start_world(name: str = "cpu") -> tuple[World, str]:
    """(world, this rank's device) for `--device name`: the device checked and mapped by
    `rank_device` before any process group exists, then the world joined (`init_world`).

    A bad device (e.g. 'cuda' on a machine without CUDA) or a bad PROTONETS_DIST_TIMEOUT is a
    `UserInputError` that every rank shares, printed once by rank 0: such a rank joins with the
    CPU backend (gloo) just to share it. Alone (no torchrun): `World()` and the checked device.
    """
    if not launched_by_torchrun():
        return World(), rank_device(name)
    problem: UserInputError | None = None
    try:
        device, timeout = rank_device(name), collective_timeout()
    except UserInputError as exc:
        problem, device, timeout = exc, "cpu", timedelta(seconds=_PROBLEM_TIMEOUT_S)
    try:
        world = init_world(device, timeout=timeout)
    except Exception:
        if problem is None:
            raise
        raise problem from None  # its peers did not join the CPU backend: this rank's own line
    with all_ranks_agree(world):
        if problem is not None:
            raise problem
    return world, device


def current_world() -> World:
    """The world of an already initialised process group (`World()` if there is none)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return World()
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj` (JSON-like, small), in rank order; `[obj]` in a single process."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(world: World, obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (JSON-like, small)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def all_ranks_agree(world: World) -> Iterator[None]:
    """Run a checking phase on every rank; if any rank raised a UserInputError, every rank
    raises the first failing rank's message (prefixed 'rank R: ' when R is not 0). Outside
    torchrun this is a plain block. Every rank must enter it, or the others wait."""
    if not world.distributed:
        yield
        return
    error: str | None = None
    try:
        yield
    except UserInputError as exc:
        error = str(exc)
    failures = [(rank, e) for rank, e in enumerate(all_gather(world, error)) if e is not None]
    if failures:
        rank, message = failures[0]
        prefix = "" if rank == 0 else f"rank {rank}: "
        raise RankError(prefix + message, quiet=not world.is_main)


def settle_shared_error(error: BaseException) -> None:
    """After a `RankError` (rank 0 has printed it): wait until every rank got here, so that no
    rank exits first and has torchrun stop rank 0 before its line is out."""
    if isinstance(error, RankError):
        barrier(current_world())


def leave_process_group() -> None:
    """Leave the process group, if this process joined one (the end of every command)."""
    import sys

    if "torch.distributed" in sys.modules:  # never imports torch for a command that did not
        finish(current_world())


def finish(world: World) -> None:
    """Leave the process group at the end of a command (no-op outside torchrun)."""
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def joined_process_group() -> bool:
    """Whether this process started a process group with `init_world` (a torchrun rank)."""
    return _joined


def end_rank_process(status: int) -> None:
    """End this process now with `status`, skipping the interpreter's finalisation, if it
    started a process group (`joined_process_group`); otherwise do nothing. For the command's
    entry point only, after its last collective.

    Gloo's worker threads release the last collective's tensors just after it completes, which
    needs the GIL; when that lands in finalisation, the thread is stopped mid-destructor and the
    process aborts ("terminate called without an active exception", exit -6, now and then)
    although its work is done. So the output is flushed and the process leaves at once.
    """
    if not _joined:
        return
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing more to say
    os._exit(status)
