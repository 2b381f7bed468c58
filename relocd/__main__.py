"""`python -m relocd` is the `relocd` command."""

import sys

from relocd.cli import main

sys.exit(main())
