"""Generation strategies, one file each; all are token-exact to `greedy`.

Each is a function generate(run, **options) -> iterator of emitted token lists.
"""

from . import assisted, greedy, lookup, stairs, staged

STRATEGIES = {
    "greedy": greedy.generate,
    "assisted": assisted.generate,
    "stairs": stairs.generate,
    "lookup": lookup.generate,
    "staged": staged.generate,
}
NEEDS_ASSISTANT = {"assisted", "stairs", "staged"}
