"""`python -m bench.gpu ARGS` is `stairs-bench gpu ARGS`."""

from bench.common import alias

raise SystemExit(alias("gpu"))
