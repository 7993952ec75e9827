import numpy as np
import pytest

from protonets.encoders.errors import UserInputError
from protonets.eval.datasets import csv_split, image_folder, load_dataset, omniglot
from tests.conftest import EXAMPLES, require_data


def test_omniglot_vinyals_test_split():
    root = require_data("omniglot")
    ds = omniglot(root, "test")
    assert ds.num_classes == 423 * 4 and len(ds) == 423 * 4 * 20
    assert np.bincount(ds.labels).tolist() == [20] * (423 * 4)
    rotations = {item.rotation for item in ds.items}
    assert rotations == {0, 90, 180, 270}
    assert all("images_evaluation" in item.path for item in ds.items[:100])


def test_omniglot_bad_split():
    root = require_data("omniglot")
    with pytest.raises(UserInputError, match="trainval"):
        omniglot(root, "nonsense")


def test_caltech_builtin_split_is_disjoint_and_complete():
    root = require_data("caltech101", "101_ObjectCategories")
    splits = {s: image_folder(root, f"caltech101/{s}") for s in ("train", "val", "test")}
    names = [set(d.class_names) for d in splits.values()]
    assert [len(n) for n in names] == [61, 10, 30]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert "BACKGROUND_Google" not in set().union(*names)


def test_image_folder_and_split_file(tmp_path):
    ds = image_folder(EXAMPLES / "support")
    assert ds.num_classes == 5 and len(ds) == 25
    split = tmp_path / "two.txt"
    split.write_text("# two classes\nlotus\nmenorah\n")
    ds = image_folder(EXAMPLES / "support", str(split))
    assert ds.class_names == ["lotus", "menorah"] and len(ds) == 10
    split.write_text("lotus\nunicorn\n")
    with pytest.raises(UserInputError, match="unicorn"):
        image_folder(EXAMPLES / "support", str(split))


def test_csv_split(tmp_path):
    rows = ["filename,label"] + [f"{c}/image_000{i}.jpg,{c}" for c in ("lotus", "menorah") for i in (1, 2)]
    (tmp_path / "s.csv").write_text("\n".join(rows))
    ds = load_dataset("csv", EXAMPLES / "support", str(tmp_path / "s.csv"))
    assert ds.class_names == ["lotus", "menorah"] and ds.labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "bad.csv").write_text("filename,label\nmissing.jpg,x\n")
    with pytest.raises(UserInputError, match="bad.csv:2"):
        csv_split(tmp_path / "bad.csv", EXAMPLES / "support")


def test_ravi_csv_format_is_read():
    csv_file = require_data("splits", "mini-imagenet-ravi", "test.csv")
    with pytest.raises(UserInputError, match="not found"):  # the images themselves are not here
        csv_split(csv_file, "/nonexistent")
