"""Training option names, importable without torch (the command line lists them in `--help`)."""

AUGMENTATIONS = ("none", "flip", "shift", "flip+shift")
