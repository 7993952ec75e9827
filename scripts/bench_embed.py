"""Encoder pipeline speed: decode + preprocess + forward (Encoder.embed) against a bare forward.

Both sides see the same images in one run. The bare side is `model(x)` on tensors already
decoded and preprocessed in memory, in the memory format the pipeline uses (channels_last by
default); the default format is timed too, which shows what channels_last buys on this CPU.

    python scripts/bench_embed.py --images 256 --batch-size 64 --workers 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from protonets.encoders import create_encoder, list_images, open_image

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101" / "101_ObjectCategories"


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of class folders of images")
    parser.add_argument("--encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    classes = sorted(p for p in Path(args.data).iterdir() if p.is_dir())
    paths = [p for c in classes for p in list_images(c)][:: max(1, 6000 // args.images)][: args.images]
    encoder = create_encoder(args.encoder)  # channels_last, as the package runs it
    model = encoder.model
    tensors = torch.stack([encoder.transform(open_image(p)) for p in paths])
    batches_cl = [b.contiguous(memory_format=torch.channels_last) for b in tensors.split(args.batch_size)]
    batches_default = [b.contiguous() for b in tensors.split(args.batch_size)]

    def bare(batches, net):
        with torch.inference_mode():
            for b in batches:
                net(b)

    def pipeline():
        encoder.embed(paths, batch_size=args.batch_size, num_workers=args.workers, progress=False)

    n = len(paths)
    t_pipe = timed(pipeline, args.repeats)
    t_bare_cl = timed(lambda: bare(batches_cl, model), args.repeats)
    default_model = create_encoder(args.encoder, channels_last=False).model
    t_bare_default = timed(lambda: bare(batches_default, default_model), args.repeats)
    figures = {
        "images": n,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "pipeline_images_per_s": round(n / t_pipe, 2),
        "bare_forward_channels_last_images_per_s": round(n / t_bare_cl, 2),
        "bare_forward_default_format_images_per_s": round(n / t_bare_default, 2),
        "pipeline_vs_bare_ratio": round(t_bare_cl / t_pipe, 3),
        "channels_last_speedup": round(t_bare_default / t_bare_cl, 3),
    }
    for key, value in figures.items():
        print(f"{key:42s} {value}")
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
