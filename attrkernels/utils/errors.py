"""Errors raised across layers."""
from __future__ import annotations


class NotPositiveDefiniteError(ValueError):
    """A matrix (or a damped curvature) that must be positive definite is not.

    The one such error of the library: raised by the packed Cholesky (``kernels.packed``), block
    CG's Gram solves (``kernels.cg``), TRAK's kernel factorisation and the influence methods; the
    message says which matrix and, where a method raises it, what damping would fix it.
    ``found``: the offending value (a pivot or a curvature along a direction) when one is known.
    Keyword ``details`` become attributes: ``curvature`` and ``largest`` (block CG: the smallest
    and largest Rayleigh quotients seen), ``pivot`` (packed Cholesky: 0-based index of the first
    leading minor that is not positive definite).
    """

    def __init__(self, message: str, found: float | None = None, **details):
        super().__init__(message)
        self.found = found
        for name, value in details.items():
            setattr(self, name, value)


class ExampleError(ValueError):
    """A problem with particular examples of a batch (non-finite values, labels out of range).

    ``examples``: their indices within the batch; ``problem``: what is wrong with them, phrased to
    follow "examples [...] ". A method's pass over a loader re-raises it with ``locate`` so the
    message names the examples' indices in the whole data set and the checkpoint.
    """

    def __init__(self, problem: str, examples, *, fix: str = "", where: str = ""):
        self.problem, self.fix, self.where = problem, fix, where
        self.examples = [int(i) for i in examples]
        shown = self.examples[:10]
        more = f" (and {len(self.examples) - 10} more)" if len(self.examples) > 10 else ""
        super().__init__(f"{problem}: examples {shown}{more}{where}{'; ' + fix if fix else ''}")

    def locate(self, start: int, what: str = "", context: str = "") -> "ExampleError":
        """The same error with indices shifted by ``start`` (the batch's first example in the
        loader) and the loader / checkpoint named."""
        where = f" of the {what} loader" if what else ""
        where += f" ({context})" if context else ""
        err = ExampleError(self.problem, [start + i for i in self.examples], fix=self.fix, where=where)
        return err
