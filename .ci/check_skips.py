"""Fail when pytest skipped a test for a reason .ci/allowed-skips does not list.

usage: python .ci/check_skips.py JUNIT_XML ALLOWED_FILE
Reads pytest's --junitxml record; prints every skip (allowed or not) and exits 1 if any reason
matches none of the allowed patterns (regular expressions matched at the start of the reason).
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET


def skips(junit: str) -> list[tuple[str, str]]:
    """(test id, reason) of every skipped or xfailed test case in a junit xml file."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for node in case.findall("skipped"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            reason = node.get("message", "")
            if reason == "collection skipped":  # a whole module: its reason is in the text
                reason += f" ({' '.join((node.text or '').split())})"
            out.append((name, re.sub(r"^[^:]*\.py:\d+: ", "", reason)))  # drop 'file.py:N: '
    return out


def main(argv: list[str]) -> int:
    """Command-line entry point."""
    junit, allowed_file = argv
    with open(allowed_file, encoding="utf-8") as f:
        allowed = [re.compile(ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")]
    found = skips(junit)
    bad = [(n, r) for n, r in found if not any(p.match(r) for p in allowed)]
    for name, reason in found:
        print(f"{'UNEXPECTED' if (name, reason) in bad else 'allowed'} skip: {name}: {reason}")
    print(f"{len(found)} skipped, {len(bad)} for a reason not in {allowed_file}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
