import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protonets.cli import main
from tests.conftest import EXAMPLES


@pytest.fixture
def support(tmp_path):
    """A copy of the examples' support set (3 classes) that tests may damage."""
    root = tmp_path / "support"
    for name in ("brontosaurus", "lotus", "menorah"):
        shutil.copytree(EXAMPLES / "support" / name, root / name)
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_json_on_examples(capsys):
    code, out, err = _run(
        capsys,
        "classify",
        EXAMPLES / "support",
        EXAMPLES / "queries",
        "--format",
        "json",
        "--top-k",
        "2",
        "--quiet",
        "--workers",
        "0",
    )
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 10
    assert set(rows[0]) == {"query", "label", "probability", "top_k"}
    assert len(rows[0]["top_k"]) == 2 and rows[0]["top_k"][0][0] == rows[0]["label"]
    right = sum(r["label"] == r["query"].split("/")[-1].rsplit("_image", 1)[0] for r in rows)
    assert right >= 9


def test_classify_table_and_csv(capsys, support):
    query = EXAMPLES / "queries" / "lotus_image_0006.jpg"
    code, out, _ = _run(capsys, "classify", support, query, "--quiet", "--workers", "0")
    assert code == 0 and "lotus" in out.splitlines()[2]
    code, out, _ = _run(capsys, "classify", support, query, "--format", "csv", "--quiet")
    assert code == 0 and out.splitlines()[0].startswith("query,label,probability,top_1,top_1_probability,")


def _one_line_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("protonets: error")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"plain text, not a jpeg", None])
def test_bad_support_image_exits_2_naming_the_file(capsys, support, content):
    bad = support / "lotus" / "broken.jpg"
    if content is None:  # truncated real JPEG
        data = (support / "lotus" / "image_0001.jpg").read_bytes()
        content = data[: len(data) // 3]
    bad.write_bytes(content)
    code, _, err = _run(capsys, "classify", support, EXAMPLES / "queries", "--quiet", "--workers", "0")
    _one_line_error(code, err, "broken.jpg")


def test_skip_bad_warns_and_goes_on(capsys, support, tmp_path):
    (support / "lotus" / "broken.jpg").write_bytes(b"")
    queries = tmp_path / "q"
    queries.mkdir()
    shutil.copy(EXAMPLES / "queries" / "lotus_image_0006.jpg", queries)
    (queries / "bad.png").write_text("nope")
    code, out, err = _run(
        capsys, "classify", support, queries, "--skip-bad", "--format", "json", "--workers", "0"
    )
    assert code == 0
    assert "broken.jpg" in err and "bad.png" in err and "warning" in err
    rows = json.loads(out)
    assert [r["label"] for r in rows] == ["lotus"]


def test_bad_folders_and_paths(capsys, support, tmp_path):
    (support / "empty_class").mkdir()
    code, _, err = _run(capsys, "classify", support, EXAMPLES / "queries", "--quiet")
    _one_line_error(code, err, "empty_class")
    (support / "empty_class").rmdir()

    one = tmp_path / "one"
    shutil.copytree(support / "lotus", one / "lotus")
    code, _, err = _run(capsys, "classify", one, EXAMPLES / "queries", "--quiet")
    _one_line_error(code, err, "at least 2 class")

    code, _, err = _run(capsys, "classify", support, tmp_path / "missing.jpg", "--quiet")
    _one_line_error(code, err, "missing.jpg")

    code, _, err = _run(capsys, "classify", tmp_path / "nowhere", EXAMPLES / "queries", "--quiet")
    _one_line_error(code, err, "nowhere")


def test_unknown_model_and_unfit_checkpoint(capsys, support, tmp_path):
    code, _, err = _run(capsys, "classify", support, EXAMPLES / "queries", "--encoder", "resnet1800")
    _one_line_error(code, err, "did you mean")
    ckpt = tmp_path / "w.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(3, 3)}, ckpt)
    code, _, err = _run(capsys, "classify", support, EXAMPLES / "queries", "--checkpoint", ckpt)
    _one_line_error(code, err, "does not fit")


def test_hub_model_without_network(capsys, support, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # the hub is unreachable here; on a machine with network access it must look unreachable too
    monkeypatch.setattr("protonets.encoders.factory._hub_reachable", lambda *a, **k: False)
    code, _, err = _run(capsys, "classify", support, EXAMPLES / "queries", "--encoder", "resnet18")
    _one_line_error(code, err, "--checkpoint")


def test_console_script_exit_status_and_no_traceback(tmp_path):
    """The installed command itself (a subprocess) exits 2 with one line on bad input."""
    script = Path(sys.executable).with_name("protonets")
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "protonets"]
    proc = subprocess.run(
        [*exe, "classify", str(tmp_path / "nowhere"), str(EXAMPLES / "queries")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nowhere" in proc.stderr


class _Ended(Exception):
    """Stands in for os._exit in the tests below (the status is its argument)."""


@pytest.fixture
def joined_rank(monkeypatch):
    """This process as a torchrun rank that started a process group, with os._exit recorded."""
    import protonets.encoders.distributed as distributed

    def record_exit(status):
        raise _Ended(status)

    monkeypatch.setattr(distributed, "_joined", True)
    monkeypatch.setattr(distributed.os, "_exit", record_exit)


def test_main_and_the_console_entry_return_the_status_outside_torchrun(monkeypatch, tmp_path, capsys):
    from protonets.cli import run_console

    argv = ["classify", str(tmp_path / "missing"), str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["protonets", *argv])
    assert main(argv) == 2
    assert run_console() == 2  # no process group joined: nothing ends the process
    assert capsys.readouterr().err.count("missing' does not exist") == 2


@pytest.mark.parametrize(
    ("fault", "status", "said"),
    [
        (None, 0, ""),
        (SystemExit(143), 143, ""),
        (SystemExit("bye"), 1, "bye"),
        (RuntimeError("bug"), 1, "RuntimeError: bug"),
    ],
)
def test_a_torchrun_rank_ends_at_once_with_the_commands_status(
    joined_rank, monkeypatch, capsys, fault, status, said
):
    """After the command, a rank skips interpreter finalisation (gloo's threads could abort it
    there), with main's status, a SystemExit's, or 1 and the traceback after a bug."""
    import protonets.cli as cli

    def command():
        if fault is not None:
            raise fault
        return 0

    monkeypatch.setattr(cli, "main", command)
    with pytest.raises(_Ended) as ended:
        cli.run_console()
    assert ended.value.args == (status,)
    assert said in capsys.readouterr().err


def test_classify_with_every_query_unreadable_is_an_error_not_an_empty_answer(tmp_path, capsys):
    from tests.test_embed import FAST, make_dataset

    support = make_dataset(tmp_path / "support", classes="ab", per_class=2)
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("x.png", "y.png"):
        (queries / name).write_bytes(b"not an image")
    code, out, err = _run(capsys, "classify", support, queries, "--skip-bad", *FAST)
    assert code == 2 and out == ""
    assert "no QUERY image could be read" in err


def test_classify_refuses_a_support_class_named_like_rejected_queries(tmp_path, capsys):
    from tests.test_embed import FAST, make_dataset

    support = make_dataset(tmp_path / "support", classes="ab", per_class=2)
    (support / "a").rename(support / "unknown")
    code, _, err = _run(capsys, "classify", support, support / "b", "--threshold", "0.5", *FAST)
    assert code == 2 and "support class 'unknown'" in err and "rename that folder" in err
    code, _, _ = _run(capsys, "classify", support, support / "b", *FAST)  # no threshold: a class like any
    assert code == 0


def test_a_mistyped_choice_or_head_name_is_answered_with_the_closest_one(capsys):
    from protonets.encoders.errors import UserInputError
    from protonets.heads import create_head

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--method", "bdcspn", "--dataset", "omniglot", "--data", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "invalid choice: 'bdcspn'" in err and "did you mean 'bd-cspn'?" in err
    with pytest.raises(SystemExit):
        main(["classify", "--head", "zzzz", "a", "b"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess
    with pytest.raises(UserInputError, match="did you mean 'laplacianshot'"):
        create_head("laplaceshot")


def test_support_folder_warns_of_one_image_in_two_classes(support, caplog):
    import logging

    from protonets.cli.common import support_folder

    lotus = sorted((support / "lotus").iterdir())[0]
    shutil.copy(lotus, support / "lotus" / "again.jpg")  # twice in its own class: not a conflict
    with caplog.at_level(logging.WARNING, logger="protonets.cli"):
        support_folder(str(support))
    assert not caplog.records
    shutil.copy(lotus, support / "menorah" / "copy.jpg")
    with caplog.at_level(logging.WARNING, logger="protonets.cli"):
        support_folder(str(support))
    [record] = caplog.records
    assert "in two classes" in record.getMessage() and "menorah" in record.getMessage()
    assert "copy.jpg" in record.getMessage()


def test_a_symlink_from_a_class_folder_up_to_the_support_folder_is_a_loop(support, caplog):
    import logging

    from protonets.cli.common import support_folder
    from protonets.encoders.errors import UserInputError

    (support / "lotus" / "up").symlink_to("..")  # would read every other class into lotus
    with pytest.raises(UserInputError, match=r"lotus/up' is a symlink loop \(it leads back to '.*support'\)"):
        support_folder(str(support))
    with caplog.at_level(logging.WARNING, logger="protonets.cli"):
        paths, labels = support_folder(str(support), skip_bad=True)
    assert not [p for p, label in zip(paths, labels) if label == "lotus" and "/up/" in p]
    assert len(caplog.records) == 1 and "skipped" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--ways", "1"),
        ("--val-ways", "1"),
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--lr-gamma", "0"),
        ("--weight-decay", "-0.1"),
    ],
)
def test_train_refuses_a_bad_number_as_an_argument_error(capsys, tmp_path, option, value):
    argv = ["train", "--method", "protonet", "--dataset", "folder", "--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(tmp_path / "run"), option, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {option}: must be" in err
    assert not (tmp_path / "run").exists()


def test_loose_images_macos_clutter_and_a_folder_for_an_image(support, tmp_path, capsys, caplog):
    import logging

    from protonets.cli.common import support_folder
    from protonets.encoders.errors import UserInputError

    (support / "__MACOSX" / "lotus").mkdir(parents=True)  # a macOS zip's resource forks: ignored
    (support / "__MACOSX" / "lotus" / "._image_0001.jpg").write_bytes(b"\0\5\26\7")
    paths, labels = support_folder(str(support))
    assert sorted(set(labels)) == ["brontosaurus", "lotus", "menorah"]

    shutil.copy(support / "lotus" / "image_0001.jpg", support / "stray.jpg")
    with caplog.at_level(logging.WARNING, logger="protonets.cli"):
        assert support_folder(str(support))[0] == paths  # left out, and said so
    assert "is not a class: its images are left out; it holds 1 image(s) directly" in caplog.text

    loose = tmp_path / "loose"
    shutil.copytree(support / "lotus", loose)
    with pytest.raises(UserInputError, match=r"found 0; it holds \d+ image\(s\) directly: put each class's"):
        support_folder(str(loose))
    assert main(["embed", str(loose), "--output", str(tmp_path / "set"), "--quiet"]) == 2
    assert "has no class sub-folders; it holds" in capsys.readouterr().err
    assert main(["verify", str(loose), str(next(loose.iterdir())), "--quiet"]) == 2
    assert "is a folder; give one image file" in capsys.readouterr().err


def test_version(capsys):
    import protonets

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"protonets {protonets.__version__}"
