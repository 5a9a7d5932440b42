"""The GPU check's driver (benchmarks/gpu_check.py) on stand-in steps: each step's status, time
limit and output are recorded, a failing or hanging step does not stop the next one, the summary
and the pack are written. (The check's own steps run in CI's dry run: .ci/run.)"""
import json
import sys
import tarfile
import textwrap
import zipfile

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import Step

STAND_INS = {
    "ok_step": "print('measured'); print('note: all good')",
    "skip_step": "import sys; print('skipped: no peer'); sys.exit(77)",
    "fail_step": "import sys; print('partial'); sys.stderr.write('Traceback: boom\\n'); sys.exit(3)",
    "hang_step": "import time; time.sleep(60)",
    "table_step": "import sys; open(sys.argv[-1] + '/table.md', 'w').write('| a |\\n|---|\\n| 1 |')",
    "peer_step": "import gpucheck_peer; print('note: peer', gpucheck_peer.VALUE)",
}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    for name, code in STAND_INS.items():
        (mods / f"{name}.py").write_text(textwrap.dedent(code) + "\n")
    monkeypatch.setenv("PYTHONPATH", str(mods))
    out = tmp_path / "out"
    steps = [Step(name.removesuffix("_step"), 30 if name != "hang_step" else 3, name, argv=[name])
             for name in ("ok_step", "skip_step", "fail_step", "hang_step")]
    steps.append(Step("table", 30, "writes a table", argv=["table_step", str(out)]))
    monkeypatch.setattr(gpu_check, "steps", lambda out_: steps)
    monkeypatch.setattr(gpu_check, "gpu_visible", lambda python: True)
    return out


def test_every_step_recorded_and_later_steps_run(stand_ins, tmp_path):
    pack = tmp_path / "pack"
    code = gpu_check.main(["--out", str(stand_ins), "--pack", str(pack)])
    assert code == 1  # a step failed and one timed out
    summary = json.loads((stand_ins / "summary.json").read_text())
    status = {r["step"]: r for r in summary["steps"]}
    assert [r["step"] for r in summary["steps"]] == ["ok", "skip", "fail", "hang", "table"]
    assert status["ok"]["status"] == "ok" and status["ok"]["note"] == "all good"
    assert status["skip"]["status"] == "skipped" and status["skip"]["note"] == "skipped: no peer"
    assert status["fail"]["status"] == "failed" and status["fail"]["exit_code"] == 3
    assert "Traceback: boom" in status["fail"]["output_tail"]
    assert status["hang"]["status"] == "timeout" and status["hang"]["seconds"] < 20
    assert status["table"]["status"] == "ok"
    md = (stand_ins / "summary.md").read_text()
    assert "| fail | failed |" in md and "## table" in md and "| 1 |" in md
    assert "partial" in (stand_ins / "fail.log").read_text()
    # the pack: what the device tool brings back ($OUT), at most 8 files
    assert sorted(p.name for p in pack.iterdir()) == ["gpu_results.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(pack / "gpu_results.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu/summary.json" in names and "gpu/fail.log" in names


def test_budget_cuts_the_last_steps(stand_ins, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESERVE_S", 1)
    gpu_check.main(["--out", str(stand_ins), "--budget", "4.5", "--only", "hang,table"])
    status = {r["step"]: r for r in json.loads((stand_ins / "summary.json").read_text())["steps"]}
    assert status["hang"]["status"] == "timeout" and status["hang"]["limit_s"] == 3
    assert status["table"]["status"] == "skipped" and "budget" in status["table"]["note"]


def test_refuses_a_folder_it_did_not_write(tmp_path, stand_ins):
    stand_ins.mkdir()
    (stand_ins / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not empty"):
        gpu_check.main(["--out", str(stand_ins), "--only", "ok"])
    assert (stand_ins / "precious.txt").exists()


def test_no_gpu_without_dry_run_says_how(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_visible", lambda python: False)
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_gpu_steps_fit_the_budget():
    steps = gpu_check.steps(gpu_check.ROOT / "unused")
    assert sum(s.limit_s for s in steps) + gpu_check.RESERVE_S <= gpu_check.BUDGET_S <= 8 * 60
    assert len({s.name for s in steps}) == len(steps)
    for s in steps:
        if s.argv and s.argv[0].startswith("benchmarks.gpu."):
            __import__(s.argv[0])  # every step module imports (its code runs in the dry run)
    assert sys.modules["benchmarks.gpu.reference"].SHAPES


def make_wheel(folder, name, version, module_text):
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}.py", module_text)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", f"{name}.py,,\n{dist}/METADATA,,\n{dist}/WHEEL,,\n{dist}/RECORD,,\n")


def test_carried_wheels_reach_the_later_steps(stand_ins, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "gpucheck_peer", "1.0", "VALUE = 42\n")
    make_wheel(wheels, "pytest", "0.0.1", "raise ImportError('must not shadow the installed pytest')\n")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    steps = [Step("wheels", 60, "carried wheels"), Step("peer", 30, "imports the peer", argv=["peer_step"])]
    monkeypatch.setattr(gpu_check, "steps", lambda out_: steps)
    assert gpu_check.main(["--out", str(stand_ins)]) == 0
    status = {r["step"]: r for r in json.loads((stand_ins / "summary.json").read_text())["steps"]}
    assert "installed gpucheck_peer 1.0" in status["wheels"]["note"]
    assert "pytest" in status["wheels"]["note"] and "already there" in status["wheels"]["note"]
    assert status["peer"]["status"] == "ok" and status["peer"]["note"] == "peer 42"
