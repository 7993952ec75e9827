"""Inverted lists and vectors memory-mapped from a saved memory's files (see `ondisk.py`)."""

from __future__ import annotations

import os
from typing import Any

import faiss


def ondisk_lists(index: faiss.Index | None) -> Any:
    """The `OnDiskInvertedLists` of an IVF index whose lists live in a mapped file, else None."""
    if not isinstance(index, faiss.IndexIVF):
        return None
    lists = faiss.downcast_InvertedLists(index.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def read_mapped_index(index_path: str, lists_path: str) -> faiss.Index:
    """Read `index.faiss` without its lists, then map `lists.ivfdata` (read-only)."""
    index = faiss.read_index(index_path, faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    lists = ondisk_lists(index)
    if lists is None:
        raise ValueError("the index file does not describe on-disk inverted lists")
    if os.path.getsize(lists_path) < lists.totsize:
        raise ValueError(f"the lists file holds {os.path.getsize(lists_path)} bytes, needs {lists.totsize}")
    lists.filename = lists_path
    lists.do_mmap()
    return index


def lists_to_ram(index: faiss.Index) -> None:
    """Replace mapped inverted lists by an in-RAM copy (before the index is changed)."""
    lists = ondisk_lists(index)
    if lists is None:
        return
    ram = faiss.ArrayInvertedLists(lists.nlist, lists.code_size)
    for i in range(lists.nlist):
        size = lists.list_size(i)
        if size:
            ram.add_entries(i, size, lists.get_ids(i), lists.get_codes(i))
    index.replace_invlists(ram, True)
    ram.this.disown()  # the index owns it now
