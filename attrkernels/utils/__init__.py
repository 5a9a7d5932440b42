"""Plumbing shared by every layer: argument checks, walking nested batches, the library's errors.

Nothing here knows about models, kernels or methods; everything else may import it.
"""
