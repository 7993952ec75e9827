"""`protonets memory build|add|query|info|rename|calibrate`: a saved, growing support memory of
embedded images.

`add`, `rename` and `calibrate` change a memory under its folder's exclusive lock, re-reading it there, so
concurrent runs all keep their rows. Every row records the sha256 of its image file: images
already in the memory are skipped (with a count) unless `--allow-duplicates`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from protonets.encoders.atomic import MANIFEST, check_bundle_target, sha256_file
from protonets.encoders.defaults import DEFAULT_ENCODER
from protonets.encoders.errors import NoPublishedWeightsError, UserInputError

from ..memory.options import INDEX_KINDS, KIND, METRICS, MODES  # no faiss: --help stays quick
from .common import (
    add_encoder_options,
    check_inputs,
    class_images,
    non_negative_int,
    positive_int,
    query_paths,
    write_rows,
)

if TYPE_CHECKING:  # torch and faiss are imported when a command runs, not for --help
    from protonets.encoders import Encoder

    from ..memory import SupportMemory

log = logging.getLogger("protonets.cli")


def add_parser(sub: argparse._SubParsersAction, summary: str) -> None:
    p = sub.add_parser(
        "memory",
        help=summary,
        description="A support memory: embedded, labelled support images saved in a folder, "
        "searched exactly or through a FAISS index, grown class by class.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    b = actions.add_parser(
        "build",
        help="embed a support folder (or take an embedding set) into a new memory",
        description="Build a memory from a support folder, or from an embedding set saved by "
        "`protonets embed` (--from-embeddings). Under torchrun (--from-embeddings, --index ivf|ivfpq) "
        "rank 0 trains the index on a seeded sample, every rank adds its share of rows, and the "
        "inverted lists are merged on disk: the memory is saved in the on-disk layout (as with "
        "--on-disk) and memory-mapped when loaded, so it can exceed RAM. With several nodes, DIR "
        "must be on storage every node sees.",
    )
    b.add_argument("directory", metavar="DIR", help="folder to save the memory in")
    source = b.add_mutually_exclusive_group(required=True)
    _from_option(source, required=False)
    source.add_argument(
        "--from-embeddings",
        dest="embeddings",
        metavar="EMB",
        help="an embedding set folder written by `protonets embed` (no images are embedded)",
    )
    b.add_argument("--metric", choices=METRICS, default="cosine")
    b.add_argument("--index", choices=INDEX_KINDS, default="auto", help="default: %(default)s")
    b.add_argument(
        "--on-disk",
        action="store_true",
        help="(--from-embeddings, --index ivf|ivfpq) merge the inverted lists on disk and keep the raw "
        "vectors in a memory-mapped file: loads map them instead of reading them (always on under torchrun)",
    )
    b.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: sized to the data)")
    b.add_argument("--nprobe", type=positive_int, default=None, help="lists probed (default: calibrated)")
    b.add_argument("--pq-m", type=positive_int, default=None, help="IVF-PQ bytes per vector (default: dim/8)")
    b.add_argument(
        "--rerank",
        type=non_negative_int,
        default=None,
        help="IVF-PQ: re-rank max(RERANK × k, 256) candidates exactly against the raw vectors "
        "(0: off; default 10)",
    )
    b.add_argument("--force", action="store_true", help="replace a memory already saved in DIR")
    _common(b, run_build)

    a = actions.add_parser("add", help="embed a support folder and add it to a saved memory")
    a.add_argument("directory", metavar="DIR", help="a saved memory")
    _from_option(a)
    a.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="add images whose file content is already in the memory (default: skip them)",
    )
    _common(a, run_add)

    q = actions.add_parser("query", help="classify query images against a saved memory")
    q.add_argument("directory", metavar="DIR", help="a saved memory")
    q.add_argument("queries", metavar="QUERY", nargs="+", help="image files or folders of images")
    q.add_argument("--k", type=positive_int, default=5, help="neighbours (knn) or classes listed")
    q.add_argument("--mode", choices=MODES, default="prototype", help="default: %(default)s")
    q.add_argument("--format", choices=["table", "json", "csv"], default="table")
    _common(q, run_query)

    i = actions.add_parser("info", help="describe a saved memory (and verify its files)")
    i.add_argument("directory", metavar="DIR", help="a saved memory")
    i.add_argument("--format", choices=["table", "json"], default="table")
    i.set_defaults(run=run_info)

    r = actions.add_parser("rename", help="rename a class of a saved memory")
    r.add_argument("directory", metavar="DIR", help="a saved memory")
    r.add_argument("old", metavar="OLD", help="the class name now")
    r.add_argument("new", metavar="NEW", help="its new name")
    r.set_defaults(run=run_rename)

    c = actions.add_parser(
        "calibrate",
        help="calibrate a saved IVF memory's search again (nprobe, and an IVF-PQ memory's re-ranked "
        "shortlist), e.g. one saved by an earlier release",
    )
    c.add_argument("directory", metavar="DIR", help="a saved memory")
    c.set_defaults(run=run_calibrate)


def _from_option(p: Any, required: bool = True) -> None:
    kwargs = {"required": True} if required else {}
    p.add_argument(
        "--from",
        dest="support",
        metavar="SUPPORT_DIR",
        **kwargs,
        help="folder with one sub-folder of images per class",
    )


def _common(p: argparse.ArgumentParser, run: Any) -> None:
    p.add_argument("--skip-bad", action="store_true", help="warn about unreadable images and go on")
    add_encoder_options(p)
    p.set_defaults(run=run, encoder=None)  # None: the memory's own encoder (or the default)
    for action in p._actions:
        if action.dest == "encoder":
            action.help = f"timm model name (default: the memory's own; build: {DEFAULT_ENCODER})"


def class_folders(root: str, skip_bad: bool = False) -> tuple[list[str], list[str]]:
    """Image paths and labels from a folder with one sub-folder per class (one class is enough)."""
    if not os.path.isdir(root):
        raise UserInputError(f"--from '{root}' does not exist or is not a folder")
    paths, labels = class_images(root, skip_bad=skip_bad)
    if not paths:
        raise UserInputError(f"--from '{root}' has no class sub-folders of images")
    return paths, labels


def _hashes(paths: list[str]) -> list[str]:
    """sha256 of each file's content (what makes two images the same for duplicate checks)."""
    out = []
    for path in paths:
        try:
            out.append(sha256_file(path))
        except OSError as exc:
            raise UserInputError(
                f"'{path}' cannot be read ({exc.strerror}); fix its permissions or remove it"
            ) from None
    return out


def _encoder(args: argparse.Namespace, memory_dir: str | None = None, device: str = "cpu") -> Encoder:
    from protonets.encoders.factory import create_encoder

    name, stored = args.encoder, {}
    if memory_dir is not None:
        try:
            with open(os.path.join(memory_dir, MANIFEST), encoding="utf-8") as handle:
                stored = json.load(handle).get("encoder_fingerprint") or {}
            name = name or stored.get("model")
        except (OSError, ValueError, AttributeError):
            stored = {}  # SupportMemory.load reports what is wrong with the folder
    try:
        return create_encoder(name or DEFAULT_ENCODER, checkpoint_path=args.checkpoint, device=device)
    except NoPublishedWeightsError:
        if args.checkpoint is None and isinstance(stored, dict) and stored.get("weights_sha256"):
            raise UserInputError(  # e.g. conv4: no weights of its own, the memory's came from a file
                f"memory '{memory_dir}' was built with the weights of a checkpoint ({stored.get('model')}, "
                f"sha256 {str(stored['weights_sha256'])[:12]}…); pass --checkpoint DIR with those weights"
            ) from None
        raise


def _embed(encoder: Encoder, paths: list[str], args: argparse.Namespace, desc: str):
    return encoder.embed(
        paths,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.quiet,
        skip_bad=args.skip_bad,
        desc=desc,
    )


def _check_build_target(args: argparse.Namespace, fingerprint: dict[str, Any] | None = None) -> None:
    """DIR must be new, empty or (with --force) hold a memory; says which encoder a memory there has."""
    manifest = os.path.join(args.directory, MANIFEST)
    if os.path.exists(manifest) and not args.force:
        stored = None
        try:
            with open(manifest, encoding="utf-8") as handle:
                stored = json.load(handle).get("encoder_fingerprint")
        except (OSError, ValueError, AttributeError):
            pass
        if fingerprint is not None and isinstance(stored, dict) and stored != fingerprint:
            raise UserInputError(
                f"'{args.directory}' holds a memory built with encoder {stored.get('model')}, but "
                f"'{args.embeddings}' was embedded by {fingerprint.get('model')}: build into a new folder, "
                "or pass --force to replace that memory"
            )
    check_bundle_target(args.directory, KIND)
    if os.path.exists(manifest) and not args.force:
        raise UserInputError(
            f"'{args.directory}' already holds a memory: grow it with `protonets memory add`, "
            "or pass --force to replace it"
        )


def _index_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"nlist": args.nlist, "nprobe": args.nprobe, "pq_m": args.pq_m, "rerank": args.rerank}


def run_build(args: argparse.Namespace) -> int:
    if args.embeddings is not None:
        return _build_from_embeddings(args)
    if args.on_disk:
        raise UserInputError("--on-disk builds from an embedding set: pass --from-embeddings EMB")
    if os.path.exists(os.path.join(args.directory, MANIFEST)) and not args.force:
        raise UserInputError(
            f"'{args.directory}' already holds a memory: grow it with `protonets memory add`, "
            "or pass --force to replace it"
        )
    check_bundle_target(args.directory, KIND)
    paths, labels = class_folders(args.support, skip_bad=args.skip_bad)
    device, paths, labels, _ = check_inputs(args, paths, labels, [])  # before any model is built
    hashes = _hashes(paths)
    from ..memory import SupportMemory

    encoder = _encoder(args, device=device)
    result = _embed(encoder, paths, args, "support")
    memory = SupportMemory(
        encoder.dim,
        metric=args.metric,
        index=args.index,
        encoder_fingerprint=encoder.fingerprint,
        **_index_options(args),
    )
    memory.add(result.embeddings, [labels[i] for i in result.kept], sources=[hashes[i] for i in result.kept])
    memory.save(args.directory)
    _summary("built", args.directory, memory)
    return 0


def _build_from_embeddings(args: argparse.Namespace) -> int:
    """`memory build --from-embeddings EMB`: in RAM, or sharded and merged on disk (--on-disk,
    torchrun). Every rank checks the inputs together: bad input anywhere stops all with one line."""
    from protonets.encoders.distributed import all_ranks_agree, init_world, launched_by_torchrun

    on_disk = args.on_disk or launched_by_torchrun()
    world = init_world("cpu")
    # a shared error reaches `main`, which prints it on rank 0 and leaves the process group
    with all_ranks_agree(world):
        if on_disk and args.index not in ("ivf", "ivfpq"):
            why = "under torchrun" if launched_by_torchrun() else "with --on-disk"
            raise UserInputError(
                f"{why}, memory build needs --index ivf or --index ivfpq (got {args.index!r}): "
                "only inverted lists are merged on disk"
            )
        if args.pq_m is not None and args.index != "ivfpq":
            raise UserInputError("--pq-m is for --index ivfpq")
        if not os.path.isdir(args.embeddings):
            raise UserInputError(
                f"--from-embeddings '{args.embeddings}' does not exist or is not a folder; "
                "make one with `protonets embed DATA --output EMB`"
            )
        from ..memory.ondisk import EmbeddingFile

        emb = EmbeddingFile(args.embeddings, verify=world.is_main)  # one sha256 pass, on rank 0
        if args.encoder is not None and args.encoder != emb.fingerprint.get("model"):
            raise UserInputError(
                f"--encoder {args.encoder} differs from the encoder that embedded "
                f"'{args.embeddings}' ({emb.fingerprint.get('model')}); drop --encoder"
            )
        if args.pq_m is not None and emb.dim % args.pq_m:
            raise UserInputError(f"--pq-m {args.pq_m} must divide the embedding width {emb.dim}")
        from ..memory import indexes

        if args.index in indexes.MIN_TRAIN and emb.count < indexes.MIN_TRAIN[args.index]:
            raise UserInputError(
                f"'{args.embeddings}' holds {emb.count} rows; an {args.index} memory needs at "
                f"least {indexes.MIN_TRAIN[args.index]} to train on (use --index flat)"
            )
        if world.is_main:
            _check_build_target(args, emb.fingerprint)
    if on_disk:
        from ..memory.indexes import IndexParams
        from ..memory.ondisk import build

        o = _index_options(args)
        params = IndexParams(
            o["nlist"], o["nprobe"], o["pq_m"], rerank=10 if o["rerank"] is None else o["rerank"]
        )
        memory = build(
            world,
            emb,
            args.directory,
            kind=args.index,
            metric=args.metric,
            params=params,
            fingerprint=emb.fingerprint,
            progress=not args.quiet,
        )
    else:
        from protonets.encoders.embedding_set import EmbeddingSet

        from ..memory import SupportMemory

        data = EmbeddingSet.load(args.embeddings)
        memory = SupportMemory(
            data.dim,
            metric=args.metric,
            index=args.index,
            encoder_fingerprint=data.fingerprint,
            **_index_options(args),
        )
        names = list(data.class_names)
        memory.add(data.embeddings, [names[i] for i in data.labels.tolist()])
        memory.save(args.directory)
    if world.is_main:
        _summary("built", args.directory, memory)
    return 0


def run_add(args: argparse.Namespace) -> int:
    paths, labels = class_folders(args.support, skip_bad=args.skip_bad)
    device, paths, labels, _ = check_inputs(args, paths, labels, [])  # before any model is built
    hashes = _hashes(paths)
    from ..memory import SupportMemory

    encoder = _encoder(args, args.directory, device)
    snapshot = SupportMemory.load(args.directory, encoder=encoder)  # checks before embedding
    new = list(range(len(paths)))
    if not args.allow_duplicates:  # images already in the memory, or twice in this folder
        held = snapshot.source_classes(hashes)
        elsewhere = [i for i, c in enumerate(held) if c is not None and str(c) != str(labels[i])]
        if elsewhere:  # the same image under another class: say so, it is not a plain repeat
            shown = "; ".join(f"'{paths[i]}' ({labels[i]}) is in class '{held[i]}'" for i in elsewhere[:3])
            more = f" and {len(elsewhere) - 3} more" if len(elsewhere) > 3 else ""
            log.warning(
                "%d image(s) are already in the memory under another class, so they are not added: "
                "%s%s; remove the copies from this folder, or pass --allow-duplicates to add them too",
                len(elsewhere),
                shown,
                more,
            )
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}  # first file of each content
        new = [i for i in new if held[i] is None and first[hashes[i]] == i]
    del snapshot
    result = _embed(encoder, [paths[i] for i in new], args, "support") if new else None
    kept = [new[j] for j in result.kept] if result is not None else []
    with SupportMemory.updating(args.directory, encoder=encoder) as memory:  # re-read under the lock
        rows = list(range(len(kept)))
        if not args.allow_duplicates and kept:  # another run may have added them meanwhile
            known = memory.has_sources([hashes[i] for i in kept])
            rows = [r for r in rows if not known[r]]
        if rows:
            memory.add(
                result.embeddings[rows],
                [labels[kept[r]] for r in rows],
                sources=[hashes[kept[r]] for r in rows],
            )
    skipped = len(paths) - len(new) + len(kept) - len(rows)
    note = (
        f" (skipped {skipped} already in the memory or repeated in the folder; --allow-duplicates adds them)"
        if skipped
        else ""
    )
    _summary(f"added {len(rows)} images{note} to", args.directory, memory)
    return 0


def run_rename(args: argparse.Namespace) -> int:
    from ..memory import SupportMemory

    with SupportMemory.updating(args.directory) as memory:
        old: str | int = args.old
        if old not in memory.classes and args.old.lstrip("-").isdigit() and int(args.old) in memory.classes:
            old = int(args.old)
        memory.rename_class(old, args.new)
    print(f"renamed class {args.old!r} to {args.new!r} in '{args.directory}'")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from ..memory import SupportMemory

    with SupportMemory.updating(args.directory) as memory:
        before = memory.info().get("calibration")
        try:
            after = memory.calibrate()
        except ValueError as exc:
            raise UserInputError(f"'{args.directory}': {exc}") from None
    print(f"calibrated '{args.directory}': {json.dumps(after)} (was {json.dumps(before)})")
    return 0


def run_query(args: argparse.Namespace) -> int:
    import numpy as np

    from ..memory import SupportMemory

    queries = query_paths(args.queries, skip_bad=args.skip_bad)
    device, _, _, queries = check_inputs(args, [], [], queries)  # before any model is built
    encoder = _encoder(args, args.directory, device)
    memory = SupportMemory.load(args.directory, encoder=encoder)
    result = _embed(encoder, queries, args, "queries")
    rows: list[dict[str, Any]] = []
    if result.kept:
        x = result.embeddings
        labels, scores = memory.classify(x, mode=args.mode, k=args.k)
        if args.mode == "knn":
            top_s, top_l = memory.search(x, k=args.k)
        else:
            table, names = memory.prototype_scores(x)
            order = np.argsort(-table, axis=1, kind="stable")[:, : args.k]
            top_s = np.take_along_axis(table, order, 1)
            top_l = np.asarray(names, dtype=object)[order]
        for row, i in enumerate(result.kept):
            rows.append(
                {
                    "query": queries[i],
                    "label": str(labels[row]),
                    "score": round(float(scores[row]), 6),
                    "top_k": [
                        [str(name), round(float(s), 6)]
                        for name, s in zip(top_l[row], top_s[row])
                        if name is not None
                    ],
                }
            )
    write_rows(rows, args.format, sys.stdout, value="score")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..memory import SupportMemory

    memory = SupportMemory.load(args.directory)
    info = {"directory": args.directory, **memory.info(), "class_counts": memory.class_counts()}
    if args.format == "json":
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    counts = info.pop("class_counts")
    for key, value in info.items():
        print(f"{key:>13}: {value}")
    shown = ", ".join(f"{name} ({n})" for name, n in list(counts.items())[:20])
    more = f", … {len(counts) - 20} more" if len(counts) > 20 else ""
    print(f"{'class counts':>13}: {shown}{more}")
    return 0


def _summary(verb: str, directory: str, memory: SupportMemory) -> None:
    from ..memory.indexes import MIN_TRAIN

    structure = memory.structure
    if memory.index_kind in MIN_TRAIN and structure == "flat":  # asked for, not yet trainable
        structure = (
            f"flat search for now (--index {memory.index_kind} is trained once the memory holds "
            f"{MIN_TRAIN[memory.index_kind]:,} vectors; until then search is exact)"
        )
    else:
        structure += " search"
    print(
        f"{verb} '{directory}': {memory.count} vectors, {len(memory.classes)} classes, "
        f"{memory.metric}, {structure}"
    )
