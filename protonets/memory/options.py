"""The memory's option names and on-disk kind, importable without faiss or torch (the command
line lists them in `--help`)."""

#: 2: memories saved on disk (`lists.ivfdata` beside `index.faiss`, mapped on load); others are 1.
FORMAT_VERSION = 2
KIND = "protonets.SupportMemory"
METRICS = ("cosine", "l2")
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
MODES = ("prototype", "knn")
