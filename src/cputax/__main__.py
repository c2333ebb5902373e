"""`python -m cputax` is the `cputax` command."""

import sys

from cputax.cli import main

sys.exit(main())
