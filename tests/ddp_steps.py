"""Test helper run by `torchrun` (tests/test_distributed_train.py): a few distributed steps of one
trainer on synthetic 28×28 images; each rank saves its parameters and the episodes it drew.

    torchrun --standalone --nproc-per-node 2 tests/ddp_steps.py METHOD STEPS OUT_DIR

METHOD: protonet, siamese, maml or relation (the head trained with Conv-4). Writes
OUT_DIR/rank<R>.safetensors: `first.<name>` for every trained parameter after the first step,
`param.<name>` after the last, and `episodes` (the index tensors this rank sampled, stacked).
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

from protonets.encoders import create_encoder
from protonets.encoders.distributed import World, end_rank_process, finish, init_world
from protonets.training import EpisodicTrainer, ImageSet, TrainConfig


def synthetic(classes: int, per_class: int, seed: int) -> ImageSet:
    """Random binary 'characters' (a template per class, partly erased, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(classes, 1, 28, 28, generator=g) < 0.2).float()
    keep = (torch.rand(classes * per_class, 1, 28, 28, generator=g) < 0.8).float()
    ink = templates.repeat_interleave(per_class, 0) * keep
    return ImageSet((255 * (1 - ink)).to(torch.uint8), torch.arange(classes).repeat_interleave(per_class))


def config(method: str, steps: int) -> TrainConfig:
    """A tiny run: 3-way episodes, no validation, the learning-rate schedule constant."""
    if method == "siamese":
        from protonets.siamese.training import SiameseConfig

        return SiameseConfig(ways=3, shots=1, queries=1, episodes=steps, lr_step=1000, val_every=1000, seed=5)
    return TrainConfig(ways=3, shots=1, queries=2, episodes=steps, lr_step=1000, val_every=1000, seed=5)


def make_trainer(method: str, steps: int, world: World, meta_batch: int | None = None) -> EpisodicTrainer:
    """The trainer of `method` (the same weights on every rank: seeded before the encoder).
    MAML's meta-batch is one task per rank unless `meta_batch` is given."""
    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False)
    data, cfg = synthetic(8, 4, 1), config(method, steps)
    if method == "siamese":
        from protonets.siamese.training import SiameseTrainer

        return SiameseTrainer(encoder, data, None, cfg, progress=False, world=world)
    if method == "maml":
        from protonets.maml.train import MetaConfig, MetaTrainer

        meta = MetaConfig(method="maml", meta_batch=meta_batch or world.size, inner_steps=1, inner_lr=0.1)
        return MetaTrainer(encoder, data, None, cfg, meta, progress=False, world=world)
    if method == "relation":  # a trained head with its encoder
        from protonets.training.joint_heads import JointHeadMethod

        def joint(d):  # noqa: ANN001, ANN202
            return JointHeadMethod(d, "relation", hidden=8)

        return EpisodicTrainer(encoder, data, None, cfg, progress=False, world=world, method=joint)
    return EpisodicTrainer(encoder, data, None, cfg, progress=False, world=world)


def trained_parameters(trainer: EpisodicTrainer) -> dict[str, torch.nn.Parameter]:
    """Every parameter the method's optimiser steps, by a stable name."""
    method = trainer.method
    modules = {"model": trainer.model}
    if hasattr(method, "learner"):
        modules = {"learner": method.learner}
    elif isinstance(getattr(method, "head", None), torch.nn.Module):
        modules["head"] = method.head
    return {f"{k}.{n}": p for k, m in modules.items() for n, p in m.named_parameters()}


def main() -> None:
    method, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    world = init_world("cpu")
    trainer = make_trainer(method, steps, world)
    drawn = []
    sample = trainer.data.sample
    trainer.data.sample = lambda count=None: drawn.append(sample(count)) or drawn[-1]
    tensors: dict[str, torch.Tensor] = {}
    step = trainer.method.train_step

    def first_step() -> tuple[torch.Tensor, torch.Tensor]:
        result = step()
        if not tensors:
            tensors.update({f"first.{k}": p.detach().contiguous().clone() for k, p in parameters().items()})
        return result

    parameters = lambda: trained_parameters(trainer)  # noqa: E731
    trainer.method.train_step = first_step
    trainer.fit()  # no validation: the last state is the best, and stays loaded
    tensors.update({f"param.{k}": p.detach().contiguous().clone() for k, p in parameters().items()})
    tensors["episodes"] = torch.stack(drawn)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, f"rank{world.rank}.safetensors"))
    finish(world)


if __name__ == "__main__":
    main()
    end_rank_process(0)  # as the command does: no interpreter finalisation for a torchrun rank
