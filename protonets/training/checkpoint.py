"""Training output folders: the resume state and the JSON-lines log (crash-safe, no pickle).

An output folder holds:

    DIR/manifest.json, DIR/model-<sha>.safetensors   the best model, written by
        `protonets.encoders.checkpoint.save_checkpoint` (kind protonets.Checkpoint);
    DIR/train_log.jsonl                              one JSON line per validation
    DIR/resume/                                      the last state (kind protonets.TrainState):
        weights, Adam moments, the episode sampler's and torch's RNG states, step, best so far.

No pickle anywhere: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file

from protonets.encoders.atomic import load_bundle, save_bundle, write_bytes_atomically
from protonets.encoders.checkpoint import tensor_writer
from protonets.encoders.errors import UserInputError

STATE_KIND = "protonets.TrainState"
STATE_FORMAT_VERSION = 1
STATE_DIR = "resume"
STATE_FILE = "state.safetensors"
LOG_FILE = "train_log.jsonl"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors (`optim.<param>.<name>`) and JSON param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]
) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_state(directory: str | os.PathLike[str], tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """Save the resumable training state into `directory/resume/`."""
    manifest = {"kind": STATE_KIND, "format_version": STATE_FORMAT_VERSION, **manifest}
    save_bundle(os.path.join(directory, STATE_DIR), manifest, {STATE_FILE: tensor_writer(tensors)})


def load_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, tensors) of the resumable state in a training output folder."""
    directory = os.fspath(directory)
    path = os.path.join(directory, STATE_DIR)
    if not os.path.isdir(path):
        raise UserInputError(
            f"cannot resume from '{directory}': it has no {STATE_DIR}/ folder of training state "
            "(pass the --output folder of an earlier `protonets train` run)"
        )
    manifest, files = load_bundle(path, STATE_KIND, STATE_FORMAT_VERSION)
    if STATE_FILE not in files:
        raise UserInputError(f"'{path}': the manifest names no {STATE_FILE}; the state is damaged")
    return manifest, load_file(files[STATE_FILE])


def append_log(directory: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line to the training log (flushed and fsynced)."""
    path = os.path.join(directory, LOG_FILE)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_log(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a training log (empty if there is none)."""
    path = os.path.join(directory, LOG_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # a last line cut short by a crash while appending: dropped
                break
            raise UserInputError(
                f"training log '{path}' line {number} is not JSON; restore or remove that line"
            ) from None
    return records


def truncate_log(directory: str | os.PathLike[str], step: int) -> None:
    """Keep only the log records up to `step` (a resumed run rewrites what came after)."""
    write_log(directory, [r for r in read_log(directory) if r.get("step", 0) <= step])


def write_log(directory: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Write the whole training log at once (atomically), replacing any earlier one."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    write_bytes_atomically(os.path.join(directory, LOG_FILE), data)
