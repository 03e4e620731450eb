"""`python -m serve`: the same as `stairs-serve`."""

from serve.cli import main

raise SystemExit(main())
