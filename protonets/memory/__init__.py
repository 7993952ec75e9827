"""FAISS support memory: millions of labelled support embeddings, incremental classes, safe saves.

from protonets import SupportMemory
memory = SupportMemory(dim=512)            # cosine, index="auto"
memory.add(embeddings, labels)             # numpy or torch [N, 512]
labels, scores = memory.classify(queries)  # nearest prototype; mode="knn" for k-NN vote
memory.save("catalogue.mem"); SupportMemory.load("catalogue.mem", encoder=encoder)
"""

from .store import FORMAT_VERSION, INDEX_KINDS, METRICS, MODES, SupportMemory

__all__ = ["FORMAT_VERSION", "INDEX_KINDS", "METRICS", "MODES", "SupportMemory"]
