"""Write eval/splits/caltech101/{train,val,test}.txt: the documented Caltech-101 class split.

101 object classes (BACKGROUND_Google left out), permuted with numpy's default_rng(0):
30 test, 10 val, the remaining 61 train. Faces and Faces_easy (the same photos, cropped
differently) are both kept in train so they never straddle two splits.

    python scripts/make_caltech101_split.py ../shared/data/caltech101/101_ObjectCategories
"""

import argparse
import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "eval" / "splits" / "caltech101"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the 101_ObjectCategories folder")
    args = parser.parse_args()
    classes = sorted(d for d in os.listdir(args.root) if d != "BACKGROUND_Google")
    perm = [classes[i] for i in np.random.default_rng(0).permutation(len(classes))]
    fixed = ["Faces", "Faces_easy"]
    rest = [c for c in perm if c not in fixed]
    splits = {"test": sorted(rest[:30]), "val": sorted(rest[30:40]), "train": sorted(rest[40:] + fixed)}
    header = "# Caltech-101 few-shot class split of protonets (scripts/make_caltech101_split.py).\n"
    OUT.mkdir(parents=True, exist_ok=True)
    for name, names in splits.items():
        (OUT / f"{name}.txt").write_text(header + "\n".join(names) + "\n")
        print(f"{name}: {len(names)} classes")


if __name__ == "__main__":
    main()
