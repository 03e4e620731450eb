"""stairs-bench: every strategy against the real peers, side by side in one run (needs [bench])."""
