"""Fault injection: a small search killed with SIGKILL in every phase, each kill followed by a rerun of the same
command, until one rerun finishes; compared with one uninterrupted run of that command.

The run: the tiny space on the embedded digits, supernet 3 epochs, 12 search trials, selection of 2 search
candidates plus the seed designs over rungs of 1 and 2 epochs, 1 finalist retrained for 3 epochs, export.
Kill k of N targets phase ``PHASES[k * 5 // N]``. Its moment is timed from the attempt itself, not from the
uninterrupted run's phase lengths (a rerun resumes a phase part-way, so those lengths overshoot it): once the
phase's start line appears ("[nasloc] 2/6 search: ..."), the kill waits for 0 or 1 of the phase's own progress
marks in this attempt (a supernet, selection or retrain checkpoint written, a search trial completed), then a
random part of the gap between its marks. So kills land mid-phase, mid-search and mid-selection included;
each is reported with the phase it landed in. While an attempt runs, every checkpoint (``last.pth``) is
watched for writes.

Reported (targets: 0 lost, 0 duplicated):
- kills per phase: targeted, and landed in the target phase;
- completed work lost: supernet, selection and retrain epochs checkpointed and then trained again; search
  trials COMPLETE at a kill and not COMPLETE in the end; selection rung scores recorded and then lost;
- duplicated trials: search trials counted beyond ``--trials``, seed designs or selection candidates
  evaluated twice;
- interrupted work (expected, not lost): search trials cut off (FAIL, counted toward ``--trials``);
- whether the end result equals the uninterrupted run's (search trials, exported weights);
- the extra time: all attempts' wall time minus the uninterrupted run's, and of it the attempts' start-up
  (imports and data loading, up to the run's first line).

    .venv/bin/python bench/bench_faults.py --kills 10 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nasloc.search.study import SEED_DESIGN_ATTR
from nasloc.selection.study import STUDY_NAME as SELECTION_STUDY
from nasloc.storage.factory import open_storage

TRIALS = 12
OPTIONS = ["--space", "tiny", "--budget", "1M", "--dataset", "digits", "--device", "cpu", "--seed", "0",
           "--supernet-epochs", "3", "--trials", str(TRIALS), "--select-top-k", "2", "--select-epochs", "2",
           "--retrain-top-k", "1", "--retrain-epochs", "3"]
PHASES = ("supernet", "search", "selection", "retrain", "export")
# The pipeline's phase lines ("[nasloc] 1/6 supernet: ...") and its last one.
MARKERS = {"1/6 supernet": "supernet", "2/6 search": "search", "3/6 report": "report", "4/6 selection": "selection",
           "5/6 retrain": "retrain", "6/6 export": "export", "] done in": "done"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--append", type=Path, default=None, help="append a markdown section to this file")
    return p.parse_args()


# ----------------------------------------------------------------------------------------- one attempt
@dataclass
class Attempt:
    """One process of the command: its phase lines as they come, and the checkpoint writes seen meanwhile."""

    results: Path
    name: str
    phases: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, phase)
    started: float = 0.0
    seconds: float = 0.0
    startup: float | None = None  # seconds to the run's first line
    returncode: int | None = None

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, str(ROOT / "run_search.py"), *OPTIONS, "--results-dir", str(self.results),
                "--run-name", self.name]
        self.started = time.monotonic()
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            now = time.monotonic() - self.started
            if self.startup is None and line.startswith("[nasloc] run "):
                self.startup = now
            self.phases += [(now, phase) for marker, phase in MARKERS.items() if marker in line]

    @property
    def phase(self) -> str:
        return self.phases[-1][1] if self.phases else "start-up"

    def alive(self) -> bool:
        return self.process.poll() is None

    def end(self, kill: bool) -> None:
        if kill and self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.returncode = self.process.wait()
        self.seconds = time.monotonic() - self.started
        self.reader.join()


class CheckpointWatch:
    """Epochs written to every ``last.pth`` of a run folder, in the order they appear (polled)."""

    def __init__(self, run: Path):
        self.run, self.seen, self.writes = run, {}, {}
        self.marks: list[tuple[float, str]] = []  # (monotonic time, phase) of each progress mark seen
        self.completed, self.polled_trials = 0, 0.0

    def poll(self) -> None:
        now = time.monotonic()
        if now - self.polled_trials > 0.25:  # a search trial completed is the search's progress mark
            self.polled_trials = now
            completed = len(completed_trials(self.run))
            self.marks += [(now, "search")] * max(0, completed - self.completed)
            self.completed = max(self.completed, completed)
        for path in self.run.glob("**/last.pth"):
            try:
                stat = path.stat()
                key = (stat.st_ino, stat.st_mtime_ns)
                if self.seen.get(path) == key:
                    continue
                state = torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError):  # replaced while we looked: the next poll sees the new one
                continue
            self.seen[path] = key
            if "optimizer" not in state:  # a finished training's checkpoint cut down (--keep-checkpoints needed)
                continue
            done = state["epoch"] + 1 if path.parent.name == "supernet" else state["epoch"]
            self.writes.setdefault(path.relative_to(self.run), []).append(done)
            self.marks.append((now, path.relative_to(self.run).parts[0]))  # supernet, selection or retrain

    def redone(self) -> dict[str, int]:
        """Per checkpoint: epochs written again after a later (or the same) epoch had been written."""
        counts = {}
        for path, epochs in self.writes.items():
            counts[str(path)] = sum(1 for i, e in enumerate(epochs) if i and e <= max(epochs[:i]))
        return counts


def run_attempt(attempt: Attempt, watch: CheckpointWatch | None, kill_phase: str | None,
                rng: random.Random) -> float | None:
    """Run ``attempt`` to its end, or kill it within ``kill_phase`` (see the module); returns the seconds from the
    phase's start line to the kill, if any."""
    attempt.start()
    started_at, marks_to_wait, kill_at = None, rng.randint(0, 1), None
    while attempt.alive():
        if watch is not None:
            watch.poll()
        if kill_phase is not None and started_at is None and any(p == kill_phase for _, p in attempt.phases):
            started_at = time.monotonic()
        if started_at is not None and kill_at is None:
            marks = [t for t, p in watch.marks if p == kill_phase and t >= started_at]
            if len(marks) >= marks_to_wait:
                times = [started_at, *marks]
                gaps = [b - a for a, b in zip(times, times[1:])] or [0.5]  # export has no marks: within 0.5 s
                kill_at = time.monotonic() + rng.uniform(0, sum(gaps) / len(gaps))
        if kill_at is not None and time.monotonic() >= kill_at:
            break
        time.sleep(0.05)
    attempt.end(kill=kill_at is not None)
    if watch is not None:
        watch.poll()
    return None if kill_at is None else kill_at - started_at


# ----------------------------------------------------------------------------------------- run state
def study(run: Path, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=open_storage(run / "study.db", create=False,
                                                                        heartbeat_interval=None))
    except (KeyError, ValueError):  # no such file or study yet (StorageError is a ValueError)
        return None


def completed_trials(run: Path) -> dict[int, tuple]:
    search = study(run, "nasloc")
    return {} if search is None else {t.number: tuple(t.values) for t in search.get_trials(states=(TrialState.COMPLETE,))}


def rung_scores(run: Path) -> set[tuple[int, int, float]]:
    selection = study(run, SELECTION_STUDY)
    return set() if selection is None else {(t.number, step, v) for t in selection.trials
                                            for step, v in t.intermediate_values.items()}


def export_digest(run: Path) -> str | None:
    weights = run / "export" / "best" / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else None


def duplicates(run: Path) -> dict[str, int]:
    search, selection = study(run, "nasloc"), study(run, SELECTION_STUDY)
    counted = [t for t in search.trials if t.state != TrialState.PRUNED]
    seeds = [t.user_attrs[SEED_DESIGN_ATTR] for t in search.trials
             if t.state == TrialState.COMPLETE and SEED_DESIGN_ATTR in t.user_attrs]
    sources = [t.user_attrs["source"] for t in selection.trials if "source" in t.user_attrs]
    numbers = [t.number for t in search.trials]
    return {"search trials beyond --trials": max(0, len(counted) - TRIALS),
            "trial numbers repeated": len(numbers) - len(set(numbers)),
            "seed designs evaluated twice": len(seeds) - len(set(seeds)),
            "selection candidates twice": len(sources) - len(set(sources))}


# ----------------------------------------------------------------------------------------- main
def phase_durations(attempt: Attempt) -> dict[str, float]:
    """Seconds from each phase's line to the next line."""
    times = attempt.phases + [(attempt.seconds, "end")]
    return {phase: times[i + 1][0] - t for i, (t, phase) in enumerate(attempt.phases)}


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nasloc-bench-faults-"))
    shutil.rmtree(work / "results", ignore_errors=True)
    rng = random.Random(args.seed)

    baseline = Attempt(work / "results", "uninterrupted")
    run_attempt(baseline, None, None, rng)
    assert baseline.returncode == 0, "the uninterrupted run failed"
    delays = phase_durations(baseline)
    print(f"uninterrupted: {baseline.seconds:.1f} s; phases: "
          + ", ".join(f"{p} {delays[p]:.1f} s" for p in PHASES), flush=True)

    run = work / "results" / "faulted"
    watch, kills, attempts = CheckpointWatch(run), [], []
    complete_at_kills: dict[int, tuple] = {}
    scores_at_kills: set = set()
    for k in range(args.kills):
        target = PHASES[k * len(PHASES) // args.kills]
        attempt = Attempt(work / "results", "faulted")
        delay = run_attempt(attempt, watch, target, rng)
        attempts.append(attempt)
        killed = attempt.returncode == -signal.SIGKILL
        complete_at_kills.update(completed_trials(run))
        scores_at_kills |= rung_scores(run)
        kills.append((target, attempt.phase if killed else "(finished first)", delay, attempt.seconds))
        print(f"kill {k + 1}/{args.kills}: target {target}, landed in {kills[-1][1]} after {attempt.seconds:.1f} s",
              flush=True)
    final = Attempt(work / "results", "faulted")
    run_attempt(final, watch, None, rng)
    attempts.append(final)
    assert final.returncode == 0, "the last rerun failed"

    end = completed_trials(run)
    lost_trials = sum(1 for n, v in complete_at_kills.items() if end.get(n) != v)
    lost_scores = len(scores_at_kills - rung_scores(run))
    redone = watch.redone()
    dup = duplicates(run)
    search = study(run, "nasloc")
    interrupted = sum(1 for t in search.trials if t.state == TrialState.FAIL)
    same_trials = sum(1 for n, v in completed_trials(work / "results" / "uninterrupted").items() if end.get(n) == v)
    total = sum(a.seconds for a in attempts)
    startup = sum(a.startup or a.seconds for a in attempts)
    report = dict(baseline=baseline, delays=delays, kills=kills, attempts=len(attempts), total=total,
                  startup=startup, redone=redone, lost_trials=lost_trials, lost_scores=lost_scores, dup=dup,
                  interrupted=interrupted, same_trials=same_trials, end_trials=len(end),
                  same_export=export_digest(run) == export_digest(work / "results" / "uninterrupted"))
    text = markdown(args, report)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def markdown(args: argparse.Namespace, r: dict) -> str:
    lost_epochs = sum(r["redone"].values())
    lines = [
        "## Faults: SIGKILL in every phase, then a rerun (`bench/bench_faults.py`)",
        "",
        f"On the shared 2-core CPU machine, torch {torch.__version__}, 1 thread. The run: "
        f"`run_search.py {' '.join(OPTIONS)}`. {args.kills} kills (seed {args.seed}), each followed by a rerun; kill k "
        "targets the phases in order, timed from the phase's start line and its own progress marks in that "
        "attempt (checkpoints written, trials completed).",
        "",
        f"    .venv/bin/python bench/bench_faults.py --kills {args.kills} --seed {args.seed}",
        "",
        f"Uninterrupted: {r['baseline'].seconds:.1f} s (" + ", ".join(f"{p} {r['delays'][p]:.1f} s" for p in PHASES) + ").",
        "",
        "| kill | target phase | landed in | seconds into the phase | attempt (s) |",
        "|---|---|---|---|---|",
    ]
    for i, (target, landed, delay, seconds) in enumerate(r["kills"], 1):
        lines.append(f"| {i} | {target} | {landed} | {'-' if delay is None else f'{delay:.1f}'} | {seconds:.1f} |")
    lines += ["", "| phase | kills aimed at it | landed in it |", "|---|---|---|"]
    for phase in PHASES:
        aimed = [landed for target, landed, _, _ in r["kills"] if target == phase]
        lines.append(f"| {phase} | {len(aimed)} | {sum(landed == phase for landed in aimed)} |")
    extra = r["total"] - r["baseline"].seconds
    lines += [
        "",
        "| result | value | target |",
        "|---|---|---|",
        f"| checkpointed epochs trained again (supernet, selection, retrain) | {lost_epochs} | 0 |",
        f"| search trials COMPLETE at a kill, not COMPLETE at the end | {r['lost_trials']} | 0 |",
        f"| selection rung scores lost | {r['lost_scores']} | 0 |",
    ]
    lines += [f"| duplicated: {name} | {count} | 0 |" for name, count in r["dup"].items()]
    lines += [
        f"| search trials cut off by a kill (FAIL, counted toward --trials) | {r['interrupted']} | - |",
        f"| search trials equal to the uninterrupted run's (number, values) | {r['same_trials']} of {r['end_trials']} "
        f"COMPLETE | - |",
        f"| exported weights identical to the uninterrupted run's | {'yes' if r['same_export'] else 'no'} | - |",
        f"| attempts / their wall time | {r['attempts']} / {r['total']:.1f} s | - |",
        f"| extra time over the uninterrupted run | {extra:.1f} s ({extra / max(len(r['kills']), 1):.1f} s per kill), "
        f"of which start-up {r['startup'] - r['baseline'].startup:.1f} s | - |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
