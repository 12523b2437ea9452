"""``python -m fprecond``: the command line."""

import sys

from fprecond.cli import main

sys.exit(main())
