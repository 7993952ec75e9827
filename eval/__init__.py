"""Measure few-shot methods: datasets and splits, episodes, the vectorised protocol, reports."""

from .datasets import FewShotDataset, csv_split, image_folder, load_dataset, omniglot
from .episodes import Episodes, sample_episodes
from .protocol import METHODS, evaluate, mean_ci95, register_method
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
    "plot_accuracy",
    "register_method",
    "result_row",
    "run_evaluation",
    "sample_episodes",
    "write_results",
]
