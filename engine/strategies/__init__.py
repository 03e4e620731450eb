"""Generation strategies, one file each; all are token-exact to `greedy`.

Each is a function generate(run, **options) -> iterator of emitted token lists.
"""

from . import assisted, greedy, lookup, staged, stairs, tree

STRATEGIES = {
    "greedy": greedy.generate,
    "assisted": assisted.generate,
    "stairs": stairs.generate,
    "tree": tree.generate,
    "lookup": lookup.generate,
    "staged": staged.generate,
}
NEEDS_ASSISTANT = {"assisted", "stairs", "staged", "tree"}
