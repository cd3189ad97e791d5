"""`python -m rlhfkit ...` runs the command line, like the `rlhfkit` script."""

import sys

from rlhfkit.cli import main

sys.exit(main())
