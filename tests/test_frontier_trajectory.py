"""Trajectory checkpoints of the frontier's cache (attrkernels.eval.checkpoints): Checkpoint objects
with learning-rate sums, cached once, an old or incomplete cache file retrained rather than misread,
and the trajectory handed to a configuration's ``run``."""
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attrkernels.eval.checkpoints import CheckpointCache
from attrkernels.eval.frontier import Config, run_frontier
from attrkernels.tasks import Checkpoint

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.frontier_configs
from tiny_tasks import TinyLogReg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_schedule_task(log=None):
    task = TinyLogReg(log=log)
    task.recipe = replace(task.recipe, schedule="linear", momentum=0.9, weight_decay=1e-3)
    return task


def test_trajectory_has_lr_sums_of_every_step_and_is_cached(tmp_path):
    log = tmp_path / "trained.log"
    task = linear_schedule_task(str(log))
    ckpts, seconds = CheckpointCache(task, tmp_path).trajectory(2)
    assert seconds > 0 and [type(c) for c in ckpts] == [Checkpoint, Checkpoint]
    steps_per_epoch = math.ceil(60 / task.recipe.batch_size)  # 60 training points, batches of 20
    rates = [task.recipe.learning_rate(t, steps_per_epoch) for t in range(task.recipe.epochs * steps_per_epoch)]
    epochs = [c.epoch for c in ckpts]
    assert epochs == [2, 5]
    cut = epochs[0] * steps_per_epoch
    assert [c.steps for c in ckpts] == [cut, len(rates) - cut]
    assert ckpts[0].lr_sum == pytest.approx(sum(rates[:cut]), rel=1e-12)
    assert ckpts[1].lr_sum == pytest.approx(sum(rates[cut:]), rel=1e-12)
    assert ckpts[1].lr == pytest.approx(rates[-1], rel=1e-12)
    final, _ = task.train(None, 0)  # the trajectory's last checkpoint is the final model of seed 0
    for key, value in final.state_dict().items():
        assert torch.equal(ckpts[-1].state_dict[key], value)

    trained = log.read_text()
    again, seconds_again = CheckpointCache(task, tmp_path).trajectory(2)
    assert log.read_text() == trained and seconds_again == seconds  # read from the cache
    for a, b in zip(ckpts, again):
        assert (a.epoch, a.lr, a.lr_sum, a.steps) == (b.epoch, b.lr, b.lr_sum, b.steps)
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def _retrained(tmp_path, corrupt) -> bool:
    """Whether a trajectory is retrained after ``corrupt(pt_path, json_path)``."""
    log = tmp_path / "trained.log"
    task = linear_schedule_task(str(log))
    cache = CheckpointCache(task, tmp_path)
    cache.trajectory(2)
    corrupt(cache.folder / "trajectory-C2.pt", cache.folder / "trajectory-C2.json")
    before = log.read_text()
    ckpts, _ = CheckpointCache(task, tmp_path).trajectory(2)
    assert all(c.lr_sum > 0 and c.steps > 0 for c in ckpts)
    return log.read_text() != before


def test_an_old_format_or_incomplete_cache_file_is_retrained(tmp_path):
    def old_format(pt, info):  # the former layout: states and last learning rates only
        saved = torch.load(pt, weights_only=True)
        torch.save({"states": [c["state_dict"] for c in saved["checkpoints"]],
                    "rates": [c["lr"] for c in saved["checkpoints"]]}, pt)

    def no_lr_sum(pt, info):
        saved = torch.load(pt, weights_only=True)
        saved["checkpoints"][0]["lr_sum"] = None
        torch.save(saved, pt)

    def json_without_format(pt, info):
        meta = __import__("json").loads(info.read_text())
        del meta["format"]
        info.write_text(__import__("json").dumps(meta))

    def other_config(pt, info):
        info.write_text(info.read_text().replace('"config": "', '"config": "0'))

    for i, corrupt in enumerate((old_format, no_lr_sum, json_without_format, other_config)):
        assert _retrained(tmp_path / str(i), corrupt), corrupt.__name__
    assert not _retrained(tmp_path / "unchanged", lambda pt, info: None)


def test_a_benchmark_without_lr_sums_is_refused(tmp_path):
    class NoSums(TinyLogReg):
        def train(self, indices=None, seed=0, *, checkpoints=0):
            model, ckpts = super().train(indices, seed, checkpoints=checkpoints)
            return model, [Checkpoint(c.state_dict, c.epoch, c.lr) for c in ckpts]

    with pytest.raises(ValueError, match="checkpoint 0 with lr_sum None.*train_classifier fills them"):
        CheckpointCache(NoSums(), tmp_path).trajectory(2)
    with pytest.raises(ValueError, match="count must be a positive int"):
        CheckpointCache(NoSums(), tmp_path).trajectory(0)


def test_a_trajectory_configuration_gets_checkpoints_with_lr_sums(tmp_path):
    seen = []

    def run(ctx, ckpts, rates):
        seen.append((ckpts, rates))
        x_train, x_test = ctx.benchmark.train_data().tensors[0], ctx.benchmark.test_data().tensors[0]
        return x_train @ x_test.T

    rows, failed = run_frontier(linear_schedule_task(), [Config("x", "x C=2", ("trajectory", 2), run)],
                                out=tmp_path / "out", runs=tmp_path / "runs", workers=1, verbose=False)
    assert failed == {} and len(rows) == 1
    (ckpts, rates), = seen
    assert [type(c) for c in ckpts] == [Checkpoint, Checkpoint] and rates == [c.lr for c in ckpts]
    assert all(c.lr_sum > 0 and c.steps > 0 for c in ckpts)


def test_source_and_trajectory_ekfac_configurations_run_on_a_trajectory(tmp_path):
    from benchmarks.frontier_configs import source_configs

    configs = source_configs(trajectories=(2,), segments=(1, 2))
    assert [c.label for c in configs] == ["SOURCE L=1 C=2", "SOURCE L=2 C=2", "EK-FAC trajectory C=2"]
    rows, failed = run_frontier(linear_schedule_task(), configs, out=tmp_path / "out", runs=tmp_path / "runs",
                                workers=1, verbose=False)
    assert failed == {} and len(rows) == 3
    for row in rows:
        assert -1 <= row["ci_low"] <= row["lds"] <= row["ci_high"] <= 1 and row["train_s"] > 0
    # a logistic regression on two blobs: every method ranks the subsets well
    assert min(row["lds"] for row in rows) > 0.5, rows
