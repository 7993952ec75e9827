"""`python -m protonets ...` runs the `protonets` command."""

import sys

from protonets.cli import main

sys.exit(main())
