"""`python -m influence_hooks.cli`: the command line."""

import sys

from . import main

sys.exit(main())
