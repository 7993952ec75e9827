"""The MAML family's method names, importable without torch (the command line lists them)."""

METHODS = ("maml", "fomaml", "anil")
