"""Reports: result rows, a Markdown table, a JSON document and an accuracy-vs-shots plot."""

from __future__ import annotations

import json
import os
from typing import Any

from protonets.encoders.atomic import write_atomically, write_json_atomically
from protonets.stats import ci_or_none


def _ci(row: dict) -> str:
    """A row's 95% half-width in points, or n/a (one episode)."""
    return "n/a" if row["ci95"] is None else f"{100 * row['ci95']:.2f}"


def result_row(
    method: str,
    ways: int,
    shots: int,
    queries: int,
    mean: float,
    ci95: float,
    episodes: int,
    query_balance: str = "balanced",
    alpha: float | None = None,
    capped_episodes: int | None = None,
) -> dict:
    """One result: accuracy and its 95% confidence half-width, both in [0, 1].

    `queries` is per class on average (each episode has ways × queries); Dirichlet rows add
    `alpha` and `capped_episodes` (episodes where a class had fewer images than its share).
    """
    row = {
        "method": method,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "episodes": episodes,
        "query_balance": query_balance,
        "accuracy": round(mean, 6),
        "ci95": None if ci_or_none(ci95) is None else round(ci95, 6),  # None: one episode
    }
    if query_balance != "balanced":
        row.update(alpha=alpha, capped_episodes=capped_episodes)
    return row


def _balance(row: dict[str, Any]) -> str:
    """'balanced', or e.g. 'dirichlet (α=2, 3 episodes capped)': capped episodes are closer to
    balanced than α asks, because a class had fewer images than its share."""
    balance = row.get("query_balance", "balanced")
    if row.get("alpha") is None:
        return balance
    capped = row.get("capped_episodes")
    note = f", {capped} of {row['episodes']} episodes capped" if capped else ""
    return f"{balance} (α={row['alpha']:g}{note})"


def markdown_table(results: list[dict[str, Any]], published: dict | None = None) -> str:
    """Rows of method × setting as 'mean ± ci' percentages; optional published numbers column.

    A query-balance column appears when some row is not balanced."""
    balance = any(r.get("query_balance", "balanced") != "balanced" for r in results)
    header = "| method | ways | shots | queries | episodes |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    if balance:
        header += " query balance |"
        rule += " --- |"
    header += " accuracy (%) |"
    rule += " ---: |"
    if published:
        header += " published (%) |"
        rule += " ---: |"
    lines = [header, rule]
    for r in results:
        line = f"| {r['method']} | {r['ways']} | {r['shots']} | {r['queries']} | {r['episodes']} |"
        if balance:
            line += f" {_balance(r)} |"
        line += f" {100 * r['accuracy']:.2f} ± {_ci(r)} |"
        if published:
            value = published.get((r["ways"], r["shots"]))
            line += f" {value} |" if value is not None else " |"
        lines.append(line)
    return "\n".join(lines)


#: What `plot_accuracy` writes, and the mark it leaves in the file (see `written_by_eval`).
PLOT_TYPES = (".png", ".pdf", ".svg")
_PLOT_MARK = "protonets eval"


def write_results(path: str | os.PathLike[str], document: dict[str, Any]) -> None:
    """Write the results document as JSON, atomically."""
    write_json_atomically(path, document)


def written_by_eval(path: str | os.PathLike[str], kind: str) -> bool:
    """Whether the existing file `path` is a results document (`kind` 'results') or a plot
    ('plot') that `protonets eval` wrote, so that writing it again loses nothing of the user's."""
    try:
        if kind == "plot":
            if os.path.getsize(path) > 64 << 20:
                return False
            with open(path, "rb") as f:
                return _PLOT_MARK.encode() in f.read()
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and isinstance(document.get("results"), list) and "encoder" in document


def plot_accuracy(results: list[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> None:
    """Accuracy against shots with 95% CI bars, one line per (method, ways). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from protonets.encoders.errors import UserInputError

        raise UserInputError("--plot needs matplotlib: pip install 'protonets[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        series.setdefault((r["method"], r["ways"]), []).append(r)
    for (method, ways), rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["shots"])
        ax.errorbar(
            [r["shots"] for r in rows],
            [100 * r["accuracy"] for r in rows],
            yerr=[100 * (r["ci95"] or 0.0) for r in rows],
            marker="o",
            capsize=3,
            label=f"{method}, {ways}-way",
        )
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    suffix = os.path.splitext(os.fspath(path))[1].lower() or ".png"
    mark = {"Software" if suffix == ".png" else "Creator": _PLOT_MARK}  # see written_by_eval
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=suffix.lstrip("."), dpi=120, metadata=mark))
    plt.close(fig)
