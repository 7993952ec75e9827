"""Training throughput: `EpisodicTrainer` against a minimal hand-written ProtoNet loop.

Both train a copy of the same Conv-4 (same init) on the same uint8 images with the same episode
shape, in alternating blocks so that a change in machine load hits both alike. Prints episodes/s
of each and the ratio (goal: trainer / hand-written >= 0.9).

    .venv/bin/python scripts/bench_train.py                       # synthetic Omniglot-sized data
    .venv/bin/python scripts/bench_train.py --data ../shared/data/omniglot   # the real train split
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from protonets.encoders import Encoder, create_encoder
from protonets.training import EpisodicTrainer, ImageSet, TrainConfig, preload_images


def load_data(args: argparse.Namespace, encoder: Encoder) -> ImageSet:
    if args.data:
        from protonets.eval.datasets import omniglot

        ds = omniglot(args.data, "train")
        return ImageSet(preload_images(ds.items, encoder.preprocessing, progress=False), ds.labels)
    g = torch.Generator().manual_seed(0)  # Omniglot train split shape: 4112 classes x 20 images
    images = torch.randint(0, 256, (4112 * 20, 1, 28, 28), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(4112).repeat_interleave(20))


class HandLoop:
    """The textbook ProtoNet step, nothing else: sample, normalise, embed, prototypes, CE, Adam."""

    def __init__(self, encoder: Encoder, data: ImageSet, ways: int, shots: int, queries: int) -> None:
        self.model = encoder.model
        self.images, self.labels = data.images, data.labels
        self.ways, self.shots, self.queries = ways, shots, queries
        self.classes = int(self.labels.max()) + 1
        self.by_class = self.images.view(self.classes, -1, *self.images.shape[1:])  # labels are sorted
        self.mean = torch.tensor(encoder.preprocessing["mean"]).view(-1, 1, 1)
        self.std = torch.tensor(encoder.preprocessing["std"]).view(-1, 1, 1)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.target = torch.arange(ways).repeat_interleave(queries)

    def step(self) -> torch.Tensor:
        n, k, q = self.ways, self.shots, self.queries
        classes = torch.randperm(self.classes)[:n]
        pick = torch.rand(n, self.by_class.shape[1]).argsort(1)[:, : k + q]
        x = self.by_class[classes.unsqueeze(1), pick].flatten(0, 1)
        x = ((x.float() / 255 - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        z = self.model(x).view(n, k + q, -1)
        protos = z[:, :k].mean(1)
        logits = -torch.cdist(z[:, k:].reshape(n * q, -1), protos).pow(2)
        loss = F.cross_entropy(logits, self.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="Omniglot root (default: synthetic data)")
    parser.add_argument("--ways", type=int, default=60)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--block", type=int, default=5, help="episodes per timed block")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks of each loop")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    encoder = create_encoder("conv4", pretrained=False)
    data = load_data(args, encoder)
    if not bool((data.labels[1:] >= data.labels[:-1]).all()) or len(data) % 20:
        raise SystemExit("the hand-written loop expects labels sorted, 20 images per class")
    hand_encoder = Encoder(copy.deepcopy(encoder.model), "conv4", encoder.preprocessing)
    hand = HandLoop(hand_encoder, data, args.ways, args.shots, args.queries)
    hand.model.train()
    config = TrainConfig(
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        episodes=1,
        val_every=10**9,
        val_at_start=False,
    )
    trainer = EpisodicTrainer(encoder, data, None, config, output=None, progress=False)

    def run_trainer() -> None:  # the public loop, block by block: fit() up to a higher episode count
        trainer.config.episodes = trainer.step + args.block
        trainer.fit()

    def run_hand() -> None:
        for _ in range(args.block):
            hand.step()

    run_trainer(), run_hand()  # warm-up
    times: dict[str, list[float]] = {"trainer": [], "hand-written": []}
    for _ in range(args.rounds):
        for name, fn in (("trainer", run_trainer), ("hand-written", run_hand)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: args.block / statistics.median(ts) for name, ts in times.items()}
    total = {name: args.block * len(ts) / sum(ts) for name, ts in times.items()}
    print(
        f"{args.ways}-way {args.shots}-shot {args.queries}-query Conv-4 episodes, {args.threads} thread(s), "
        f"{args.rounds} alternating blocks of {args.block} episodes, data: {args.data or 'synthetic'}"
    )
    for name in times:
        print(
            f"  {name:13s} {rate[name]:.3f} episodes/s (median block)  {total[name]:.3f} episodes/s (overall)"
        )
    print(
        f"  ratio trainer / hand-written: {rate['trainer'] / rate['hand-written']:.3f} (median blocks), "
        f"{total['trainer'] / total['hand-written']:.3f} (overall); goal >= 0.9"
    )


if __name__ == "__main__":
    main()
