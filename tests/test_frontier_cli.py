"""The frontier command (python -m benchmarks.frontier): user errors stop it before any work with a
message and no traceback; results are written only when there are rows; failures set the status."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import benchmarks.frontier as frontier_cli  # noqa: E402
from attrkernels.eval.frontier import Config  # noqa: E402
from attrkernels.tasks import benchmark as registry  # noqa: E402
from tiny_tasks import TinyLogReg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(tmp_path, *args, out=True):
    """Run the command in this process; returns (exit status, stderr)."""
    argv = ["--runs", str(tmp_path / "runs"), "--no-peers", *args]
    if out:
        argv += ["--out", str(tmp_path / "out")]
    try:
        return frontier_cli.main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.fixture
def previous(tmp_path):
    """An output folder holding an earlier frontier.csv and frontier.png."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "frontier.csv").write_text("earlier results\n")
    (out / "frontier.png").write_bytes(b"earlier plot")
    return out


def unchanged(out):
    return ((out / "frontier.csv").read_text() == "earlier results\n"
            and (out / "frontier.png").read_bytes() == b"earlier plot")


def test_unknown_task_is_a_message_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.frontier", "--task", "no-such-task",
                             "--runs", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "error: --task: unknown task 'no-such-task'; available: " in result.stderr
    assert "digits-mlp" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_only_matching_nothing_stops_before_the_ground_truth(tmp_path, previous, capsys):
    assert cli(tmp_path, "--only", "no-such-method") == 2
    err = capsys.readouterr().err
    assert "only=['no-such-method'] matches none of the configurations; labels: TRAK k=128 M=1" in err
    assert not (tmp_path / "runs").exists()  # no ground truth built
    assert unchanged(previous)  # earlier results not replaced by an empty table


def test_bad_out_is_reported_before_the_ground_truth(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli(tmp_path, "--out", str(tmp_path / "file" / "results"), out=False) == 2
    assert "lies below" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bad_runs_is_reported_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit:
        frontier_cli.main(["--no-peers", "--runs", str(tmp_path / "file"), "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and "error: runs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiny(monkeypatch):
    """--task tiny-logreg with tiny configurations instead of ours (no peers)."""
    monkeypatch.setitem(registry._REGISTRY, TinyLogReg.name, TinyLogReg)
    configs = []
    monkeypatch.setattr(frontier_cli, "ours", lambda quick: list(configs))
    return configs


def similarity(label):
    def run(ctx, ckpts, rates):
        return ctx.benchmark.train_data().tensors[0] @ ctx.benchmark.test_data().tensors[0].T
    return Config("baseline", label, ("none", 0), run)


def broken(label):
    def run(ctx, ckpts, rates):
        raise RuntimeError("broken on purpose")
    return Config("broken", label, ("none", 0), run)


def test_no_finished_configuration_keeps_earlier_results(tmp_path, previous, tiny, capsys):
    tiny += [broken("a"), broken("b")]
    assert cli(tmp_path, "--task", "tiny-logreg", "--workers", "1") == 1
    assert unchanged(previous)
    assert "2 configuration(s) failed: a, b" in capsys.readouterr().err


def test_a_failed_configuration_sets_the_status_and_the_rest_is_written(tmp_path, tiny, capsys):
    tiny += [broken("a"), similarity("ok")]
    assert cli(tmp_path, "--task", "tiny-logreg", "--workers", "1") == 1
    text = (tmp_path / "out" / "frontier.csv").read_text()
    assert "baseline,ok," in text and "broken" not in text
    assert "1 configuration(s) failed: a" in capsys.readouterr().err


def test_success(tmp_path, tiny, capsys):
    tiny += [similarity("ok")]
    assert cli(tmp_path, "--task", "tiny-logreg", "--workers", "1") == 0
    assert (tmp_path / "out" / "frontier.png").exists()
    assert f"1 configurations -> {tmp_path / 'out'}/frontier.csv" in capsys.readouterr().out
