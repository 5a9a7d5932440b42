"""The Pareto front of (cost, LDS) points: what no cheaper configuration beats."""
from __future__ import annotations


def pareto(rows: list, cost: str = "cost_s", score: str = "lds") -> list:
    """Rows not dominated by another row, cheapest first.

    A row is dominated when another costs no more and scores at least as high (a tie in both
    keeps the first in input order). ``rows`` are dicts with numeric ``cost`` and ``score`` keys.
    """
    front, best = [], float("-inf")
    order = sorted(range(len(rows)), key=lambda i: (rows[i][cost], -rows[i][score], i))
    for i in order:
        if rows[i][score] > best:
            front.append(rows[i])
            best = rows[i][score]
    return front
