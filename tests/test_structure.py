"""The package's shape: one import namespace, layers checked by import-linter, light imports."""

import configparser
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "setup.cfg"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _package_dirs() -> dict[str, str]:
    """setup.cfg's package_dir: import name -> folder in the repository."""
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    lines = [line.strip() for line in parser["options"]["package_dir"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_encoders_and_eval_install_under_protonets_only():
    assert _package_dirs() == {
        "protonets": "protonets",
        "protonets.encoders": "encoders",
        "protonets.eval": "eval",
    }


def test_a_users_eval_and_encoders_do_not_shadow_ours(tmp_path):
    """From a folder holding the user's own eval.py and encoders/, everything still works."""
    (tmp_path / "eval.py").write_text("USER = 'eval'\n")
    (tmp_path / "encoders").mkdir()
    (tmp_path / "encoders" / "__init__.py").write_text("USER = 'encoders'\n")
    proc = _python(
        """
        import protonets, protonets.eval, protonets.encoders
        import eval, encoders
        assert eval.USER == "eval" and encoders.USER == "encoders"  # the user's, untouched
        assert protonets.eval.__name__ == "protonets.eval" and hasattr(protonets.eval, "evaluate")
        assert hasattr(protonets.encoders, "create_encoder")
        print("ok")
        """,
        tmp_path,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    from protonets.cli import COMMANDS

    for argv in (["--help"], *([name, "--help"] for name in COMMANDS)):
        proc = subprocess.run(
            [sys.executable, "-m", "protonets", *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0 and "usage: protonets" in proc.stdout, (argv, proc.stderr[-2000:])


def test_no_top_level_eval_or_encoders_is_installed(tmp_path):
    proc = _python(
        """
        import importlib.util
        print(importlib.util.find_spec("eval"), importlib.util.find_spec("encoders"))
        """,
        tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "None"], proc.stdout + proc.stderr


HEAVY = ("protonets.eval", "protonets.training", "protonets.maml.train", "protonets.siamese.training")


@pytest.mark.parametrize(
    "code",
    [
        "import protonets",
        "from protonets.cli import main\ntry:\n    main(['classify', '--help'])\nexcept SystemExit:\n    0",
    ],
    ids=["import protonets", "classify --help"],
)
def test_light_paths_do_not_import_the_eval_or_training_stack(tmp_path, code):
    proc = _python(code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = [m for m in proc.stdout.split() if m.startswith(HEAVY)]
    assert not loaded, loaded


def test_the_package_folder_shows_tools_the_installed_layout():
    """`protonets/encoders` and `protonets/eval` are links to the root folders that install there
    (package_dir), so folder-walking tools (grimp, under `lint-imports`) see what is installed."""
    for name, folder in _package_dirs().items():
        if name != "protonets":
            link = REPO / name.replace(".", os.sep)
            assert link.is_symlink() and link.resolve() == (REPO / folder).resolve(), link


def test_every_library_module_sits_in_a_layer():
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    layers = parser["importlinter:contract:layers"]["layers"]
    named = {
        m.strip() for line in layers.splitlines() for m in line.replace("|", ":").split(":") if m.strip()
    }
    children = {
        p.stem for p in (REPO / "protonets").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    children -= {"__init__", "__main__"}
    missing = {f"protonets.{c}" for c in children} - named
    assert not missing, f"add {sorted(missing)} to a layer in setup.cfg [importlinter:contract:layers]"


def test_import_layers_and_no_cycles():
    """`lint-imports` (import-linter, the dev extra): cli -> eval -> library -> encoders, no circles."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        if os.environ.get("CI"):
            pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)  # as a user runs it
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.count(" KEPT") == 2, proc.stdout[-4000:]
