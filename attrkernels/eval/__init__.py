"""LDS evaluation: subsets, the retraining harness and its ground-truth cache, the LDS itself.

    gt = build_ground_truth(get("digits-mlp"), "runs/gt/digits", "default")
    print(lds(scores, gt.masks, gt.mean_outputs()), split_half(gt.outputs))

The LDS-vs-cost frontier runner is in submodules imported on demand: ``frontier`` (configurations
run against one ground truth, with a result cache), ``checkpoints`` (the checkpoint cache),
``pareto`` (the Pareto front) and ``report`` (CSV and plot writers).
"""
from .harness import build_ground_truth, check_benchmark, measure_dataset
from .lds import LDSResult, bootstrap_ci, lds, spearman_columns
from .quality import SplitHalf, split_half
from .store import GroundTruth, GroundTruthMismatch
from .subsets import Protocol, indices_to_counts, model_seed, resolve_protocol, sample_masks

__all__ = ["build_ground_truth", "check_benchmark", "measure_dataset", "lds", "LDSResult",
           "bootstrap_ci", "spearman_columns", "split_half", "SplitHalf", "GroundTruth",
           "GroundTruthMismatch", "Protocol", "resolve_protocol", "sample_masks", "model_seed",
           "indices_to_counts"]
