"""The memory's option names and on-disk kind, importable without faiss or torch (the command
line lists them in `--help`)."""

FORMAT_VERSION = 1
KIND = "protonets.SupportMemory"
METRICS = ("cosine", "l2")
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
MODES = ("prototype", "knn")
