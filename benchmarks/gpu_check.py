"""The GPU check: one prepared, offline run on a lent GPU machine, and its CPU dry run for CI.

    bash benchmarks/gpu_check.sh               # on the GPU machine (picks its python3)
    bash benchmarks/gpu_check.sh --dry-run     # anywhere: the GPU steps run on tiny CPU inputs

Every step runs in its own process, under its own time limit, and writes its own files into one
results folder (``--out``; default benchmarks/results/gpu, or runs/gpu-check-dry-run for the dry
run). A step that fails or runs out of time is recorded (exit code, tail of its output) and the
next step runs. summary.json / summary.md (card, driver, CUDA, versions, date, commit, each step's
status and time, then each step's table) are rewritten after every step; with ``--pack DIR`` (the
shell wrapper passes $OUT when it is set) they and gpu_results.tar.gz (the whole folder) are
copied to DIR after every step too, so a run cut short still returns what it measured.

Steps (limit in seconds; their sum stays under the 480-second budget, and each limit is cut to
what is left of the budget):

  env         25   machine and versions (env.json)                                 both modes
  wheels      20   pip install --no-index --no-deps the carried wheels              both modes
                   (benchmarks/gpu/wheels/*.whl, made by scripts/gpu_wheels.sh) into a
                   folder on PYTHONPATH, skipping any the interpreter already has
  install     75   pip install --no-deps --no-build-isolation --no-index -e .      dry run: pip --dry-run
  info        20   python -m attrkernels info                                      both modes
  tests       60   the GPU tests of the suite (test_sketch, test_philox, test_featurizer)
  reference   60   cuda / triton backends against the reference (benchmarks.gpu.reference)
  throughput  50   sketch time as a share of the bf16 / fp32 torch.mm rates
  featurize   50   ResNet-9 and GPT-2-small dense features vs torch.func + materialised P
  ekfac       60   EK-FAC fit + score, ours vs kronfluence (if installed)
  frontier    45   the digits frontier with the methods on the GPU

In the dry run (``--dry-run``; no GPU needed) the GPU steps run their code on tiny CPU inputs
(``--smoke``) and are recorded as "skipped: no GPU" when that works, as failed when it does not;
``tests`` is skipped (CI runs the whole suite). The exit status is 1 when a step failed or timed
out, else 0 (a skipped step is not a failure).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "benchmarks" / "gpu" / "wheels"
BUDGET_S = 480
RESERVE_S = 10  # kept back from the last step for the summary and the pack
MIN_STEP_S = 3  # a step with less time than this left is not started
DRY_RUN_SCALE = 2  # the dry run's limits and budget: CI shares its CPUs with other jobs
SKIP = 77
MARKER = "summary.json"


@dataclass
class Step:
    name: str
    limit_s: int
    what: str
    gpu: bool = False  # runs on tiny CPU inputs (--smoke) in the dry run
    argv: list = field(default_factory=list)  # module and arguments after `python -m`


def steps(out: Path) -> list[Step]:
    o = ["--out", str(out)]
    return [
        Step("env", 25, "machine and versions", argv=["benchmarks.gpu.env", *o]),
        Step("wheels", 20, "install the carried peer wheels"),
        Step("install", 75, "pip install --no-deps --no-build-isolation --no-index -e ."),
        Step("info", 20, "attrkernels info", argv=["attrkernels", "info"]),
        # the suite's tests that use the GPU (the rest run in CI); a timeout keeps the log
        Step("tests", 60, "GPU tests of the suite", gpu=True,
             argv=["pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(out / "tests.xml"),
                   "-k", "gpu or cuda or triton or randint4x or auto",
                   "tests/test_sketch.py", "tests/test_philox.py", "tests/test_featurizer.py"]),
        Step("reference", 60, "cuda / triton vs reference", gpu=True, argv=["benchmarks.gpu.reference", *o]),
        Step("throughput", 50, "sketch vs torch.mm rates", gpu=True, argv=["benchmarks.gpu.throughput", *o]),
        Step("featurize", 50, "dense featurisation vs torch.func", gpu=True, argv=["benchmarks.gpu.featurize", *o]),
        Step("ekfac", 60, "EK-FAC vs kronfluence", gpu=True, argv=["benchmarks.gpu.ekfac", *o]),
        Step("frontier", 45, "digits frontier, methods on GPU", gpu=True, argv=["benchmarks.gpu.frontier", *o]),
    ]


# ---------------------------------------------------------------------------------------------
# Running one step


def run_process(cmd: list[str], log: Path, limit_s: float, env: dict) -> tuple[int | None, float]:
    """Run ``cmd`` (its own process group) with output to ``log``; (exit code or None on
    timeout, seconds). On timeout the whole group gets SIGTERM, then SIGKILL."""
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = None
        # a step's stray children (e.g. worker processes) must not outlive it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return code, time.monotonic() - t0


def tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def last_line(path: Path, prefixes: tuple) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(text):
        if line.startswith(prefixes):
            return line.strip()
    return ""


class Check:
    def __init__(self, out: Path, dry_run: bool, budget_s: float, pack: Path | None, python: str):
        self.out, self.dry_run, self.pack, self.python = out, dry_run, pack, python
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.budget_s = budget_s
        self.scale = DRY_RUN_SCALE if dry_run else 1
        self.records: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        self.env.pop("GPU_CHECK_DEADLINE", None)
        self.site: Path | None = None
        if dry_run:  # as the test suite does without a GPU: Triton through its interpreter
            self.env.setdefault("TRITON_INTERPRET", "1")

    # -----------------------------------------------------------------------------------------
    def record(self, step: Step, status: str, seconds: float, limit: float, code=None, note="", log=None):
        rec = dict(step=step.name, what=step.what, status=status, seconds=round(seconds, 1),
                   limit_s=round(limit), exit_code=code, note=note)
        if log is not None and status in ("failed", "timeout"):
            rec["output_tail"] = tail(log)
        self.records.append(rec)
        mark = {"ok": "ok", "skipped": "--", "failed": "FAILED", "timeout": "TIMEOUT"}.get(status, status)
        print(f"[{time.monotonic() - self.start:6.1f} s] {step.name:<10} {mark:<7} {seconds:6.1f} s"
              f"{'  ' + note if note else ''}", flush=True)
        if status in ("failed", "timeout") and rec.get("output_tail"):
            print("    " + rec["output_tail"].replace("\n", "\n    "), flush=True)
        self.write_summary()

    def limit(self, step: Step) -> float:
        return min(step.limit_s * self.scale, self.deadline - time.monotonic() - RESERVE_S)

    def run(self, step: Step) -> None:
        limit = self.limit(step)
        if limit < MIN_STEP_S:
            self.record(step, "skipped", 0, 0, note="not run: the check's time budget is spent")
            return
        handler = getattr(self, f"step_{step.name}", None)
        if handler is not None:
            handler(step, limit)
            return
        if step.gpu and self.dry_run and step.name == "tests":
            self.record(step, "skipped", 0, limit, note="no GPU (CI runs the whole suite on the CPU)")
            return
        argv = list(step.argv)
        if step.gpu:
            argv += ["--smoke", "--device", "cpu"] if self.dry_run else ["--device", "cuda"]
            if step.name == "tests":
                argv = step.argv
        self.run_module(step, argv, limit)

    def run_module(self, step: Step, argv: list, limit: float) -> None:
        log = self.out / f"{step.name}.log"
        env = dict(self.env, GPU_CHECK_DEADLINE=str(time.time() + limit - 3))
        code, seconds = run_process([self.python, "-m", *argv], log, limit, env)
        if code is None:
            self.record(step, "timeout", seconds, limit, note=f"killed after {limit:.0f} s", log=log)
        elif code == SKIP:
            self.record(step, "skipped", seconds, limit, code, last_line(log, ("skipped:",)), log)
        elif code == 0:
            if step.gpu and self.dry_run:
                note = f"no GPU (dry run: the step's code ran on tiny CPU inputs in {seconds:.0f} s)"
                self.record(step, "skipped", seconds, limit, code, note)
            else:
                self.record(step, "ok", seconds, limit, code, self.note(step, log))
        else:
            self.record(step, "failed", seconds, limit, code, f"exit code {code}; {self.note(step, log)}", log)

    def note(self, step: Step, log: Path) -> str:
        """A step's one-line result: pytest's counts, else its last "note:" line."""
        if step.name == "tests":
            counts = [ln for ln in tail(log, 5).splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
            return counts[-1].strip("= ")[:200] if counts else ""
        return last_line(log, ("note:",)).removeprefix("note: ")

    # -----------------------------------------------------------------------------------------
    def step_wheels(self, step: Step, limit: float) -> None:
        log = self.out / "wheels.log"
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            self.record(step, "skipped", 0, limit, note=f"no wheels in {WHEELS.relative_to(ROOT)} "
                        "(scripts/gpu_wheels.sh makes them; carry that folder)")
            return
        t0 = time.monotonic()
        have, todo = [], []
        for w in wheels:
            dist = w.name.split("-")[0]
            probe = subprocess.run([self.python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                                   capture_output=True, text=True, env=self.env, check=False)
            (have if probe.returncode == 0 else todo).append((w, probe.stdout.strip()))
        note = ", ".join(f"{w.name.split('-')[0]} {v} already there" for w, v in have)
        if self.dry_run:  # install them all, to a folder that nothing imports from
            todo = [(w, "") for w in wheels]
        elif not todo:
            self.record(step, "ok", time.monotonic() - t0, limit, 0, note)
            return
        self.site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
        cmd = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(self.site), *(str(w) for w, _ in todo)]
        code, seconds = run_process(cmd, log, limit, self.env)
        installed = ", ".join(w.name.split("-")[0] + " " + w.name.split("-")[1] for w, _ in todo)
        if code == 0 and self.dry_run:
            self.record(step, "ok", time.monotonic() - t0, limit, 0,
                        f"dry run: {installed} install offline (into a scratch folder, not used)")
        elif code == 0:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), self.env.get("PYTHONPATH")]))
            self.record(step, "ok", time.monotonic() - t0, limit, 0,
                        f"installed {installed} into {self.site}" + (f"; {note}" if note else ""))
        else:
            self.record(step, "timeout" if code is None else "failed", time.monotonic() - t0, limit, code,
                        f"pip could not install {installed}", log)

    def step_install(self, step: Step, limit: float) -> None:
        log = self.out / "install.log"
        cmd = [self.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-e", "."]
        if self.dry_run:
            missing = subprocess.run([self.python, "-c", "import setuptools, pybind11"], capture_output=True,
                                     env=self.env, check=False).returncode
            if missing:
                self.record(step, "skipped", 0, limit, note="dry run: setuptools or pybind11 missing here, "
                            f"would run: {' '.join(cmd[2:])}")
                return
            cmd.insert(4, "--dry-run")  # builds the metadata the same way, installs nothing
        code, seconds = run_process(cmd, log, limit, self.env)
        if code == 0:
            what = "dry run: metadata built without isolation, nothing installed" if self.dry_run else \
                "editable install, C++ extension built in place"
            self.record(step, "skipped" if self.dry_run else "ok", seconds, limit, 0, what)
            return
        if not self.dry_run and code is not None and limit - seconds > 10:
            # e.g. site-packages not writable: the extension alone, in place (import from the tree)
            cmd = [self.python, "setup.py", "build_ext", "--inplace", "-j", str(os.cpu_count() or 1)]
            code2, seconds2 = run_process(cmd, log, limit - seconds, self.env)
            if code2 == 0:
                self.record(step, "ok", seconds + seconds2, limit, 0,
                            f"pip failed (exit {code}); built the extension in place with setup.py build_ext")
                return
        # the GPU steps need neither the install nor the extension: go on from the source tree
        self.record(step, "timeout" if code is None else "failed", seconds, limit, code,
                    "the next steps run from the source tree without the C++ extension", log)

    # -----------------------------------------------------------------------------------------
    # Summary

    def facts(self) -> dict:
        try:
            return json.loads((self.out / "env.json").read_text())
        except (OSError, ValueError):
            return {}

    def write_summary(self) -> None:
        env = self.facts()
        keys = ("card", "driver", "compute_capability", "card_memory_gib", "torch", "torch_cuda", "nvcc",
                "cupy", "cupy_cuda_runtime", "triton", "python", "date", "commit", "source_fingerprint")
        summary = {
            "mode": "dry run (CPU, GPU steps on tiny inputs)" if self.dry_run else "GPU",
            **{k: env.get(k, "unknown") for k in keys},
            "budget_s": self.budget_s, "elapsed_s": round(time.monotonic() - self.start, 1),
            "steps": self.records,
        }
        (self.out / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        lines = [f"# GPU check: {summary['mode']}", ""]
        lines += [f"- {k}: {summary[k]}" for k in keys]
        lines += [f"- elapsed: {summary['elapsed_s']} s of a {self.budget_s:.0f} s budget", "",
                  "| step | status | seconds | limit | note |", "|---|---|---|---|---|"]
        for r in self.records:
            lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {r['limit_s']} | "
                         f"{str(r['note']).replace('|', '/')} |")
        for r in self.records:
            md = self.out / f"{r['step']}.md"
            if r["step"] == "info" and (self.out / "info.log").exists():
                lines += ["", "## info", "", "```", (self.out / "info.log").read_text().strip(), "```"]
            if md.exists():
                lines += ["", f"## {r['step']}", "", md.read_text().strip()]
            if r.get("output_tail"):
                lines += ["", f"## {r['step']}: {r['status']}", "", "```", r["output_tail"], "```"]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        if self.pack is not None:
            self.write_pack()

    def write_pack(self) -> None:
        self.pack.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", MARKER):
            shutil.copy2(self.out / name, self.pack / name)
        tmp = self.pack / "gpu_results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.out, arcname="gpu")
        os.replace(tmp, self.pack / "gpu_results.tar.gz")


def prepare(out: Path) -> None:
    """An empty results folder: a previous check's folder (it holds summary.json) is cleared;
    any other non-empty folder is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SystemExit(f"{out} is not empty and holds no {MARKER} of an earlier check: "
                             "give another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def gpu_visible(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: run the GPU steps on tiny CPU inputs")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/gpu; runs/gpu-check-dry-run with --dry-run)")
    parser.add_argument("--pack", type=Path, default=None,
                        help="also copy summary.* and gpu_results.tar.gz here after every step (e.g. $OUT)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole check (default {BUDGET_S}; twice that for the dry run)")
    parser.add_argument("--only", default=None, help="comma-separated step names to run (env always runs)")
    args = parser.parse_args(argv)
    python = sys.executable
    if not args.dry_run and not gpu_visible(python):
        print(f"{python}: torch sees no CUDA GPU. On a machine without one, run the dry run: "
              "bash benchmarks/gpu_check.sh --dry-run", file=sys.stderr)
        return 2
    out = (args.out or ROOT / ("runs/gpu-check-dry-run" if args.dry_run else "benchmarks/results/gpu")).resolve()
    prepare(out)
    budget = args.budget or BUDGET_S * (DRY_RUN_SCALE if args.dry_run else 1)
    check = Check(out, args.dry_run, budget, args.pack.resolve() if args.pack else None, python)
    print(f"GPU check{' (dry run)' if args.dry_run else ''}: {python}, results in {out}, "
          f"budget {budget:.0f} s", flush=True)
    only = set(args.only.split(",")) | {"env"} if args.only else None
    try:
        for step in steps(out):
            if only is None or step.name in only:
                check.run(step)
    finally:
        if check.site is not None:
            shutil.rmtree(check.site, ignore_errors=True)
    check.write_summary()
    print(f"\nsummary: {out / 'summary.md'}" + (f" (and {check.pack})" if check.pack else ""))
    bad = [r["step"] for r in check.records if r["status"] in ("failed", "timeout")]
    if bad:
        print(f"steps that failed or timed out: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
