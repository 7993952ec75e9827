"""`python -m protonets ...` runs the `protonets` command."""

import sys

from protonets.cli import run_console

sys.exit(run_console())
