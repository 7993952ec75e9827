import json

import pytest
import torch

from protonets.cli import main
from tests.conftest import EXAMPLES, REPO


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


@pytest.fixture
def embedded(tmp_path):
    """A small saved embedding set: 5 separated classes of 8 rows."""
    from protonets.encoders.embedding_set import EmbeddingSet

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(8)
    x = 4 * torch.eye(5, 8)[labels] + torch.randn(40, 8, generator=g)
    fields = ([f"c{i}" for i in range(5)], [f"c{i // 8}/{i}.png" for i in range(40)], {"model": "m"})
    EmbeddingSet(x, labels, *fields).save(tmp_path / "emb")
    return tmp_path / "emb"


def small_eval(embedded, *extra):
    argv = ["eval", "--embeddings", str(embedded), "--ways", "3", "--shots", "1", "--queries", "2"]
    return main([*argv, "--episodes", "5", "--quiet", *map(str, extra)])


def test_eval_replaces_only_result_files_it_wrote(embedded, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG not a plot of ours")
    for target, option in [
        (embedded / "manifest.json", "--output"),
        (embedded / "embeddings.safetensors", "--output"),
        (notes, "--output"),
        (photo, "--plot"),
    ]:
        before = target.read_bytes()
        assert small_eval(embedded, option, target) == 2
        assert f"{option} '{target}' already exists" in capsys.readouterr().err
        assert target.read_bytes() == before
    results, plot = tmp_path / "r.json", tmp_path / "r.svg"
    assert small_eval(embedded, "--output", results, "--plot", plot) == 0
    assert small_eval(embedded, "--output", results, "--plot", plot) == 0  # ours: written again
    assert json.loads(results.read_text())["results"] and b"protonets eval" in plot.read_bytes()


def test_eval_output_and_plot_names_are_checked_before_work(embedded, tmp_path, capsys):
    same = tmp_path / "same.png"
    assert small_eval(embedded, "--output", same, "--plot", same) == 2
    assert "--output and --plot are the same file" in capsys.readouterr().err
    assert small_eval(embedded, "--output", tmp_path / "r.json", "--plot", tmp_path / "plot.txt") == 2
    assert "cannot draw a '.txt' file" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not same.exists()


@pytest.mark.parametrize(
    ("option", "value", "said"), [("--seed", "-1", "0 or more"), ("--ways", "1", "at least 2")]
)
def test_eval_bad_seed_or_one_way_is_an_argument_error(embedded, capsys, option, value, said):
    with pytest.raises(SystemExit) as exit_:
        small_eval(embedded, option, value)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_eval_table_says_how_many_dirichlet_episodes_were_capped(embedded, capsys):
    assert (
        small_eval(embedded, "--query-balance", "dirichlet", "--dirichlet-alpha", "1e-9", "--queries", "6")
        == 0
    )
    assert "episodes capped)" in capsys.readouterr().out


def test_eval_options_that_would_be_ignored_are_refused(embedded, tmp_path, capsys):
    assert small_eval(embedded, "--dirichlet-alpha", "0.5") == 2
    assert "--dirichlet-alpha applies to --query-balance dirichlet" in capsys.readouterr().err
    assert small_eval(embedded, "--method", "prototype", "--head-checkpoint", tmp_path / "nope") == 2
    assert "no --method here is one" in capsys.readouterr().err


def test_head_checkpoint_gives_each_trained_method_its_own_folder(embedded, tmp_path, capsys):
    from protonets.cli.evaluate import head_checkpoints
    from protonets.encoders.errors import UserInputError

    both = head_checkpoints(["feat=/a", "relation=/b=c"], ["feat", "relation"])
    assert both == {"feat": "/a", "relation": "/b=c"}
    assert head_checkpoints(["/x=y", "feat=/a"], ["feat", "siamese"]) == {"": "/x=y", "feat": "/a"}
    for values, said in [
        (["relation=/b"], "'relation' is not among --method"),
        (["prototype=/b"], "prototype takes no trained head folder"),
        (["/a", "/b"], "two folders"),
        (["feat=/a", "feat=/b"], "method 'feat' two folders"),
        (["feat="], "names no folder"),
    ]:
        with pytest.raises(UserInputError, match=said):
            head_checkpoints(values, ["feat", "prototype"])
    # each method is sent to its own folder: the one that is missing is named
    assert (
        small_eval(
            embedded,
            "--method",
            "feat",
            "siamese",
            "--head-checkpoint",
            f"feat={tmp_path / 'no-feat'}",
            f"siamese={tmp_path / 'no-siamese'}",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no-feat" in err and len(err.strip().splitlines()) == 1


def test_one_episode_reports_no_interval_rather_than_a_false_zero(embedded, tmp_path, capsys):
    out = tmp_path / "one.json"
    argv = ["eval", "--embeddings", str(embedded), "--ways", "3", "--shots", "1", "--queries", "2"]
    assert main([*argv, "--episodes", "1", "--output", str(out)]) == 0
    assert "± n/a" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][0]["ci95"] is None


def test_an_empty_output_name_is_refused(embedded, capsys):
    assert small_eval(embedded, "--output", "") == 2
    assert "--output '' is an empty name" in capsys.readouterr().err


def test_a_head_trained_on_another_encoder_or_for_another_method_is_refused(embedded, capsys):
    siamese = REPO / "checkpoints" / "siamese-conv4-omniglot"
    # the bare folder goes to the trained head only: prototype is not named in the refusal
    assert small_eval(embedded, "--method", "prototype", "siamese", "--head-checkpoint", siamese) == 2
    err = capsys.readouterr().err
    assert "--method siamese: the head in" in err and "--method prototype" not in err
    assert "trained on another encoder (conv4, weights a7ec2beffdd8) than the embeddings' (m, weights" in err
    assert "embed the images again with that body" in err  # an embedding set is not embedded here
    assert small_eval(embedded, "--method", "feat", "--head-checkpoint", f"feat={siamese}") == 2
    assert "holds a siamese head, not a feat one" in capsys.readouterr().err


def test_a_setting_given_twice_is_scored_once(embedded, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--ways", "3", "3", "--method", "prototype", "prototype", "--output", out]
    assert small_eval(embedded, *argv) == 0
    assert len(json.loads(out.read_text())["results"]) == 1
