import json

from protonets.cli import main
from tests.conftest import EXAMPLES


def test_eval_command_json_table_plot_and_reproducibility(tmp_path, capsys):
    argv = [
        "eval",
        "--dataset",
        "folder",
        "--data",
        str(EXAMPLES / "support"),
        "--ways",
        "3",
        "5",
        "--shots",
        "1",
        "2",
        "--queries",
        "2",
        "--episodes",
        "50",
        "--seed",
        "3",
        "--method",
        "prototype-cosine",
        "knn",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--workers",
        "0",
    ]
    assert main([*argv, "--output", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| method | ways |") and table.count("\n") == 2 + 8
    assert main([*argv, "--output", str(tmp_path / "b.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["results"] == b["results"]  # same seed, same numbers (second run from the cache)
    assert a["seed"] == 3 and a["encoder"]["model"] == "tf_efficientnet_lite0"
    assert a["dataset"]["classes"] == 5 and a["dataset"]["images"] == 25
    row = a["results"][0]
    assert set(row) == {"method", "ways", "shots", "queries", "episodes", "query_balance", "accuracy", "ci95"}
    assert a["query_balance"] == "balanced" and row["query_balance"] == "balanced"
    assert all(0 <= r["accuracy"] <= 1 and r["ci95"] >= 0 for r in a["results"])
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_command_bad_input(tmp_path, capsys):
    code = main(["eval", "--data", str(tmp_path / "nowhere"), "--quiet"])
    assert code == 2 and "nowhere" in capsys.readouterr().err
    code = main(
        [
            "eval",
            "--data",
            str(EXAMPLES / "support"),
            "--ways",
            "9",
            "--shots",
            "1",
            "--queries",
            "2",
            "--cache-dir",
            str(tmp_path / "c"),
            "--quiet",
            "--workers",
            "0",
        ]
    )
    assert code == 2 and "only 5 have" in capsys.readouterr().err
