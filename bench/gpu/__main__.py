"""`python -m bench.gpu ARGS` is `stairs-bench gpu ARGS`."""

from bench.gpu.run import main

raise SystemExit(main())
