"""The frontier runner (attrkernels.eval.frontier) on a tiny benchmark: rows, CSV, plot, Pareto
front, the result cache, failures and the argument checks that come before any work."""
import csv
import sys
from pathlib import Path

import pytest
import torch

import attrkernels as ak
from attrkernels.eval.frontier import (Config, FrontierArgumentError, check_writable_dir, run_frontier,
                                       select)
from attrkernels.eval.pareto import pareto

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tasks import TinyLogReg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trak_config(calls):
    def run(ctx, ckpts, rates):
        calls.append("trak")
        assert len(ckpts) == 1 and rates is None
        m = ak.TRAK(ctx.model(), ctx.benchmark.task, k=8, verbose=False)
        return m.fit(ctx.train, ckpts).score(ctx.test)
    return Config("TRAK", "TRAK k=8 M=1", ("models", 1), run, {"k": 8, "M": 1})


def similarity_config(calls):
    """Scores = input similarity (no method), on a two-checkpoint trajectory it only checks."""
    def run(ctx, ckpts, rates):
        calls.append("similarity")
        assert len(ckpts) == 2 and len(rates) == 2
        x_train = ctx.benchmark.train_data().tensors[0]
        x_test = ctx.benchmark.test_data().tensors[0]
        return x_train @ x_test.T
    return Config("baseline", "similarity C=2", ("trajectory", 2), run, {"C": 2})


def failing_config(label="broken"):
    def run(ctx, ckpts, rates):
        raise RuntimeError("this method is broken")
    return Config("broken", label, ("none", 0), run)


def read_csv(path):
    lines = Path(path).read_text().splitlines()
    header = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    rows = list(csv.DictReader(line for line in lines if not line.startswith("# ")))
    return header, rows


def run(tmp_path, configs, log=None, **kwargs):
    kwargs.setdefault("out", tmp_path / "out")
    return run_frontier(TinyLogReg(log=log), configs, runs=tmp_path / "runs", workers=1,
                        verbose=False, **kwargs)


def test_rows_csv_and_plot(tmp_path):
    calls = []
    rows, failed = run(tmp_path, [trak_config(calls), similarity_config(calls)])
    assert failed == {} and calls == ["trak", "similarity"]
    assert [r["label"] for r in rows] == ["TRAK k=8 M=1", "similarity C=2"]
    header, table = read_csv(tmp_path / "out" / "frontier.csv")
    assert header["task"] == "tiny-logreg" and header["protocol"] == "default"
    assert header["ground_truth"].startswith("6 subsets x 2 seeds, split-half")
    assert list(table[0])[:8] == ["family", "label", "lds", "ci_low", "ci_high", "train_s", "method_s",
                                  "cost_s"]
    assert {"setting_k", "setting_M", "setting_C"} <= set(table[0])
    for row, written in zip(rows, table):
        assert written["label"] == row["label"] and float(written["lds"]) == pytest.approx(row["lds"], abs=1e-4)
        assert -1 <= row["ci_low"] <= row["lds"] <= row["ci_high"] <= 1
        assert row["train_s"] > 0 and row["cost_s"] == pytest.approx(row["train_s"] + row["method_s"])
    assert table[0]["setting_k"] == "8" and table[1]["setting_C"] == "2" and table[1]["setting_k"] == ""
    assert (tmp_path / "out" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_does_no_work(tmp_path):
    calls, log = [], tmp_path / "trained.log"
    first, _ = run(tmp_path, [trak_config(calls), similarity_config(calls)], log=str(log))
    trained = log.read_text()
    assert trained  # ground truth, warm-up, the model and the trajectory were trained
    again, failed = run(tmp_path, [trak_config(calls), similarity_config(calls)], log=str(log),
                        out=tmp_path / "out2")
    assert failed == {} and calls == ["trak", "similarity"]  # not run again
    assert log.read_text() == trained  # nothing retrained
    for a, b in zip(first, again):
        assert a["lds"] == b["lds"] and a["train_s"] == b["train_s"] and a["method_s"] == b["method_s"]
    assert read_csv(tmp_path / "out2" / "frontier.csv")[1] == read_csv(tmp_path / "out" / "frontier.csv")[1]


def test_changed_settings_are_not_served_from_the_cache(tmp_path):
    calls = []
    run(tmp_path, [similarity_config(calls)])
    changed = similarity_config(calls)
    changed.settings = {"C": 2, "variant": "other"}
    run(tmp_path, [changed])
    assert calls == ["similarity", "similarity"]


def test_output_and_cache_folders_are_required(tmp_path):
    with pytest.raises(TypeError, match="out"):
        run_frontier(TinyLogReg(), [similarity_config([])], runs=tmp_path / "runs")
    with pytest.raises(TypeError, match="runs"):
        run_frontier(TinyLogReg(), [similarity_config([])], out=tmp_path / "out")


def test_a_failing_configuration_is_reported_and_the_others_written(tmp_path):
    rows, failed = run(tmp_path, [failing_config(), similarity_config([])])
    assert [r["label"] for r in rows] == ["similarity C=2"]
    assert failed == {"broken": "RuntimeError: this method is broken"}
    assert [r["label"] for r in read_csv(tmp_path / "out" / "frontier.csv")[1]] == ["similarity C=2"]


def test_nothing_is_written_when_no_configuration_finishes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "frontier.csv").write_text("previous results\n")
    rows, failed = run(tmp_path, [failing_config("a"), failing_config("b")])
    assert rows == [] and set(failed) == {"a", "b"}
    assert (out / "frontier.csv").read_text() == "previous results\n"
    assert not (out / "frontier.png").exists()
    fresh = tmp_path / "fresh"
    run(tmp_path, [failing_config()], out=fresh)
    assert not fresh.exists()


def test_arguments_are_checked_before_any_work(tmp_path):
    configs = [similarity_config([])]
    runs = tmp_path / "runs"
    cases = [
        (dict(benchmark="no-such-task"), "unknown task 'no-such-task'"),
        (dict(only=["nothing"]), r"only=\['nothing'\] matches none of the configurations; labels: similarity C=2"),
        (dict(configs=[]), "no configurations given"),
        (dict(protocol="nope"), "protocol 'nope' is not defined"),
        (dict(protocol={"m": 3, "r": 1}), "protocol must be a name"),
        (dict(workers=0), "workers must be a positive int"),
        (dict(out=tmp_path / "file"), "is a file, not a folder"),
        (dict(out=tmp_path / "file" / "below"), "lies below .* which is a file"),
        (dict(runs=tmp_path / "file" / "runs"), "runs .* lies below"),
    ]
    (tmp_path / "file").write_text("")
    for change, message in cases:
        kwargs = dict(benchmark=TinyLogReg(), configs=configs, out=tmp_path / "out", runs=runs,
                      workers=1, verbose=False)
        kwargs.update(change)
        with pytest.raises(FrontierArgumentError, match=message):
            run_frontier(kwargs.pop("benchmark"), kwargs.pop("configs"), **kwargs)
        assert not runs.exists() and not (tmp_path / "out").exists()  # no ground truth, no output


def test_select():
    configs = [similarity_config([]), trak_config([])]
    assert select(configs) == configs
    assert select(configs, ["TRAK", "zzz"]) == configs[1:]
    assert select(configs, "TRAK") == configs[1:]  # one substring, not its characters
    with pytest.raises(ValueError, match="labels must be unique; repeated: similarity C=2"):
        select([similarity_config([]), similarity_config([])])
    with pytest.raises(FrontierArgumentError, match="matches none"):
        select(configs, [""])


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # nothing created


def test_config_needs_are_checked():
    with pytest.raises(ValueError, match="needs must be"):
        Config("x", "x", ("checkpoints", 3), lambda ctx, c, r: None)


def test_one_seed_protocol_has_no_split_half(tmp_path):
    class OneSeed(TinyLogReg):
        lds_protocols = {"one-seed": {"m": 6, "r": 1, "alpha": 0.5}}

    rows, _ = run_frontier(OneSeed(), [similarity_config([])], out=tmp_path / "out", runs=tmp_path / "runs",
                           protocol="one-seed", workers=1, verbose=False)
    header, table = read_csv(tmp_path / "out" / "frontier.csv")
    assert len(table) == 1 and header["ground_truth"] == "6 subsets x 1 seeds, split-half n/a"


def test_pareto_front_on_a_hand_made_case():
    rows = [{"label": label, "cost_s": cost, "lds": score} for label, cost, score in [
        ("a", 1.0, 0.3), ("b", 2.0, 0.2),  # b: dearer and worse than a
        ("c", 2.0, 0.5), ("d", 5.0, 0.5),  # d: ties c's LDS at a higher cost
        ("e", 0.5, 0.1), ("f", 10.0, 0.7), ("g", 10.0, 0.6), ("h", 1.0, 0.3)]]  # h: a's twin
    assert [r["label"] for r in pareto(rows)] == ["e", "a", "c", "f"]
    assert pareto([]) == []


def test_scores_orientation_is_checked_by_lds(tmp_path):
    """A configuration returning [n_test, n_train] fails loudly instead of scoring garbage."""
    def transposed(ctx, ckpts, rates):
        return torch.zeros(len(ctx.benchmark.test_data()), len(ctx.benchmark.train_data()))

    rows, failed = run(tmp_path, [Config("x", "transposed", ("none", 0), transposed)])
    assert rows == [] and "transposed" in failed
