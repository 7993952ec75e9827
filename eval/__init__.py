"""Measure few-shot methods: datasets and splits, episodes, the vectorised protocol, reports."""

from protonets.episodes import Episodes, sample_episodes

from .datasets import (
    FewShotDataset,
    csv_split,
    image_folder,
    load_dataset,
    omniglot,
    omniglot_alphabets,
    within_alphabet_episodes,
)
from .protocol import METHODS, evaluate, mean_ci95
from .report import markdown_table, plot_accuracy, result_row, write_results
from .run import run_evaluation

__all__ = [
    "METHODS",
    "Episodes",
    "FewShotDataset",
    "csv_split",
    "evaluate",
    "image_folder",
    "load_dataset",
    "markdown_table",
    "mean_ci95",
    "omniglot",
    "omniglot_alphabets",
    "plot_accuracy",
    "result_row",
    "run_evaluation",
    "sample_episodes",
    "within_alphabet_episodes",
    "write_results",
]
