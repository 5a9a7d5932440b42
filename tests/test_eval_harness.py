"""Retraining harness: determinism, the ground-truth directory, resume after kill -9, refusals."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from attrkernels.eval import GroundTruth, GroundTruthMismatch, build_ground_truth, model_seed
from attrkernels.eval.store import output_path

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tasks import BadMeasureTask, TinyLogReg  # noqa: E402

PROTOCOL = {"m": 6, "r": 2}


def test_builds_a_complete_deterministic_ground_truth(tmp_path):
    gt = build_ground_truth(TinyLogReg(), tmp_path / "a", PROTOCOL, workers=1, verbose=False)
    assert gt.complete and gt.outputs.shape == (6, 2, 20) and gt.masks.shape == (6, 60)
    assert (gt.masks.sum(axis=1) == 30).all()
    assert np.isfinite(gt.outputs).all() and (gt.seconds > 0).all()
    assert gt.mean_outputs().shape == (6, 20)
    # seeds differ within a subset, and a rebuild elsewhere reproduces every output
    assert not np.array_equal(gt.outputs[:, 0], gt.outputs[:, 1])
    again = build_ground_truth(TinyLogReg(), tmp_path / "b", PROTOCOL, workers=1, verbose=False)
    np.testing.assert_array_equal(gt.outputs, again.outputs)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["protocol"] == {"m": 6, "r": 2, "alpha": 0.5, "seed": 0}
    assert meta["task_config_hash"] == TinyLogReg().config_hash()


def test_rerun_of_a_finished_directory_trains_nothing(tmp_path):
    log = tmp_path / "log"
    build_ground_truth(TinyLogReg(), tmp_path / "gt", PROTOCOL, workers=1, verbose=False)
    build_ground_truth(TinyLogReg(log=str(log)), tmp_path / "gt", PROTOCOL, workers=1, verbose=False)
    assert not log.exists()


def test_resume_after_kill_trains_only_missing_models(tmp_path):
    """Kill -9 a parallel run after some models finished; the rerun trains exactly the rest."""
    directory, first_log = tmp_path / "gt", tmp_path / "first.log"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiny_tasks import TinyLogReg
        from attrkernels.eval import build_ground_truth
        if __name__ == "__main__":
            build_ground_truth(TinyLogReg(log={str(first_log)!r}, sleep=0.4), {str(directory)!r},
                               {PROTOCOL!r}, workers=2, verbose=False)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and process.poll() is None:
            if (directory / "outputs").is_dir() and len(list((directory / "outputs").glob("*.npz"))) >= 3:
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the harness and its workers, as kill -9 would
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = GroundTruth.load(directory)
    finished = int(partial.done.sum())
    assert 3 <= finished < 12 and not partial.complete

    second_log = tmp_path / "second.log"
    resumed = build_ground_truth(TinyLogReg(log=str(second_log)), directory, PROTOCOL,
                                 workers=1, verbose=False)
    retrained = sorted(int(line) for line in second_log.read_text().split())
    missing = sorted(model_seed(0, j, k) for j in range(6) for k in range(2) if not partial.done[j, k])
    assert retrained == missing
    np.testing.assert_array_equal(resumed.outputs[partial.done], partial.outputs[partial.done])

    reference = build_ground_truth(TinyLogReg(), tmp_path / "uninterrupted", PROTOCOL, workers=1,
                                   verbose=False)
    np.testing.assert_array_equal(resumed.outputs, reference.outputs)
    np.testing.assert_array_equal(resumed.masks, reference.masks)


def test_incomplete_ground_truth_is_reported(tmp_path):
    gt = build_ground_truth(TinyLogReg(), tmp_path / "gt", PROTOCOL, workers=1, verbose=False)
    output_path(tmp_path / "gt", 2, 1).unlink()
    partial = GroundTruth.load(tmp_path / "gt")
    assert not partial.complete and partial.done.sum() == 11
    with pytest.raises(ValueError, match="incomplete: 1 of 12 models missing"):
        partial.mean_outputs()
    assert np.isnan(partial.outputs[2, 1]).all()
    np.testing.assert_array_equal(partial.outputs[0], gt.outputs[0])


def test_refuses_a_directory_of_another_task_config(tmp_path):
    build_ground_truth(TinyLogReg(lr=0.3), tmp_path / "gt", PROTOCOL, workers=1, verbose=False)
    with pytest.raises(GroundTruthMismatch, match=r"task config \(recipe\.lr: 0\.3 in the directory, 0\.1 now\)"):
        build_ground_truth(TinyLogReg(lr=0.1), tmp_path / "gt", PROTOCOL, workers=1, verbose=False)


def test_refuses_a_directory_of_another_protocol(tmp_path):
    build_ground_truth(TinyLogReg(), tmp_path / "gt", PROTOCOL, workers=1, verbose=False)
    with pytest.raises(GroundTruthMismatch, match="protocol"):
        build_ground_truth(TinyLogReg(), tmp_path / "gt", {"m": 6, "r": 3}, workers=1, verbose=False)


def test_wrong_measurement_shape_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"ColumnMeasure\.measure must return one value per example"):
        build_ground_truth(BadMeasureTask(), tmp_path / "gt", PROTOCOL, workers=1, verbose=False)
    assert not (tmp_path / "gt").exists()
