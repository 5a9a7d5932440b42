"""TRAK on shards of the training set: under torchrun, or as one task of a job array.

Under torchrun (any number of processes; the script, not the library, initialises the group):

    torchrun --standalone --nproc_per_node=2 examples/trak_sharded.py --store runs/trak-sharded \
        --out runs/trak-sharded/scores.npy

As a job array (no process group): task i of n featurises its shard, then one merge/score step:

    python examples/trak_sharded.py --store runs/trak-array --shard 0 2     # task 0 of 2
    python examples/trak_sharded.py --store runs/trak-array --shard 1 2     # task 1 of 2
    python examples/trak_sharded.py --store runs/trak-array --out runs/trak-array/scores.npy

The model is the built-in digits MLP, trained identically (same seed) by every process.
"""
import argparse
import os

import torch
import torch.distributed as dist

import attrkernels as ak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", help="where the [n_train, n_test] scores go (a .npy path every process sees)")
    p.add_argument("--shard", nargs=2, type=int, metavar=("INDEX", "COUNT"), help="job array: fit this shard only")
    p.add_argument("--k", type=int, default=512)
    args = p.parse_args()
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    bench = ak.tasks.get("digits-mlp")
    model, ckpts = bench.train(seed=0, checkpoints=1)
    train, test = bench.loaders(batch_size=100)
    trak = ak.TRAK(model, bench.task, k=args.k, store=args.store, verbose=False)
    trak.fit(train, ckpts, shard=None if args.shard is None else tuple(args.shard))
    if args.out and args.shard is None:
        scores = trak.score(test, out=args.out)
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"rank {rank}: scores {tuple(scores.shape)} in {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
