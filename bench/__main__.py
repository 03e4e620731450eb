"""`python -m bench ARGS` is `stairs-bench ARGS`."""

import sys

from bench.cli import main

sys.exit(main())
