"""The whole job of ``run_search.py`` end to end, through the real command (``nasloc.cli.main.search_main``).

Every run uses the tiny space at 16 px (budget 1M multiply-adds, inside its range) on tiny data: an
ImageFolder of 150 of scikit-learn's digits (15 per class, saved as 16 px PNGs; 130 train, 20 val). The
full digits set would take minutes per run on the loaded 2-core test machines; an ImageFolder is read
the same way by the main process, spawned search workers and Ray workers, so no monkeypatching is needed.

torch runs with one intra-op thread here: on a loaded 2-core machine two OpenMP threads make small
kernels (such as those of dilated attention) up to 50x slower.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

import nasloc
import nasloc.phases.search
import nasloc.pipeline
from nasloc.arch import Arch
from nasloc.arch_view import locality
from nasloc.cli.main import search_main
from nasloc.deploy.macs import fvcore_macs
from nasloc.run import STUDY_NAME
from nasloc.search.study import pareto_trials
from nasloc.selection.halving import finalists, selection_result
from nasloc.space.files import SPACES_DIR
from nasloc.space.search_space import SearchSpace
from nasloc.storage.factory import open_storage
from nasloc.units import format_macs

BUDGET = 1e6
PER_CLASS = 15
FINISHED_STATES = (TrialState.COMPLETE, TrialState.FAIL)


# ------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # conftest sets 2 threads before every test
        yield


def make_digits_folder(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == label)[:PER_CLASS]:
            grey = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(grey).resize((16, 16), Image.BILINEAR).convert("RGB").save(root / str(label) / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_digits_folder(tmp_path_factory.mktemp("digits") / "images")


def args(results: Path, data: Path, *extra: str, **options: object) -> list[str]:
    """The test command: tiny space, 1M budget, tiny data; ``options`` override (key_name=value)."""
    values = {"space": "tiny", "budget": "1M", "supernet_epochs": 1, "trials": 6, "retrain_top_k": 1, "retrain_epochs": 1,
              "select_epochs": 4,
              "dataset": "imagefolder", "data_dir": data, "results_dir": results, **options}
    argv = []
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + list(extra)


def run(argv: list[str]) -> int:
    started = time.perf_counter()
    status = search_main(argv)
    print(f"run_search.py {' '.join(argv)}: status {status} in {time.perf_counter() - started:.1f} s")
    return status


def run_dir_of(results: Path, budget: str = "1M") -> Path:
    return results / f"tiny-imagefolder-{budget}"


def load_study(run_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=open_storage(f"sqlite:///{run_dir / 'study.db'}"))


def epoch_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"]


def checkpoint_keys(path: Path) -> set[str]:
    return set(torch.load(path, map_location="cpu", weights_only=True))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.status, response.read()


def retrained_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "retrain").glob("trial_*"))


def exported_dir(run_dir: Path) -> Path:
    """The retrain folder of the trial that the run exported (the best retrained)."""
    trial = json.loads((run_dir / "export" / "best" / "config.json").read_text())["nasloc"]["trial"]
    return run_dir / "retrain" / f"trial_{trial}"


# ------------------------------------------------------------------------------------ one full run
@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """The run folder of one complete run of the test command."""
    results = tmp_path_factory.mktemp("results")
    with one_thread():
        assert run(args(results, data_dir)) == 0
    return run_dir_of(results)


def test_a_run_writes_every_output_consistently(finished):
    run_dir = finished
    for name in ("run.json", "study.db", "trials.csv", "pareto.csv", "pareto.html", "plotly.min.js", "summary.md",
                 "supernet/last.pth", "export/best/config.json", "export/best/model.safetensors", "export/best/arch.yaml"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["budget"] == BUDGET and record["study_name"] == STUDY_NAME
    assert epoch_of(run_dir / "supernet" / "last.pth") == 0  # one epoch, numbered from 0
    # --keep-checkpoints needed: a finished phase keeps its weights, no optimizer state, no previous checkpoint;
    # the selection's candidates keep nothing (the retrain starts from scratch)
    kept = [run_dir / "supernet" / "last.pth", *(d / "last.pth" for d in retrained_dirs(run_dir))]
    assert all("model" in (c := checkpoint_keys(path)) and "optimizer" not in c for path in kept)
    assert not list(run_dir.rglob("previous.pth")) and not list((run_dir / "selection").rglob("*.pth"))

    study = load_study(run_dir)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:  # every trial: its arch (JSON), MACs, params, timings; accuracy when within budget
        arch = nasloc.Arch.from_dict(json.loads(t.user_attrs["arch_json"]))
        assert arch.to_dict() == t.user_attrs["arch"]
        assert t.user_attrs["macs"] > 0 and t.user_attrs["params"] > 0
        assert t.datetime_start is not None and t.datetime_complete is not None
        if t.user_attrs["macs"] <= BUDGET:
            assert t.user_attrs["evaluated"] is True and 0 <= t.user_attrs["top1"] <= 100 and t.user_attrs["eval_seconds"] > 0
        else:
            assert t.user_attrs["evaluated"] is False and "top1" not in t.user_attrs

    rows = read_csv(run_dir / "trials.csv")
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    assert [int(r["macs"]) for r in rows] == [t.user_attrs["macs"] for t in trials]
    assert all(r["arch_json"] == t.user_attrs["arch_json"] and r["duration_seconds"] for r, t in zip(rows, trials))
    front = pareto_trials(study, BUDGET)
    assert front, "no trial within budget: the test budget or seed no longer fits the tiny space"
    assert [int(r["number"]) for r in read_csv(run_dir / "pareto.csv")] == [t.number for t in front]
    assert {int(r["number"]) for r in rows if r["pareto"] == "True"} == {t.number for t in front}
    assert "plotly" in (run_dir / "pareto.html").read_text()

    # the selection: every seed design (queued first in the search) among the candidates, rungs 1, 2, 4 epochs,
    # the worse half pruned at each, every rung an intermediate value, selection.csv in rank order
    selection = optuna.load_study(study_name="selection", storage=open_storage(run_dir / "study.db"))
    seeds = {t.user_attrs["seed_design"]: t for t in trials if "seed_design" in t.user_attrs}
    assert len(seeds) >= 4 and all(t.number < len(seeds) for t in seeds.values())
    by_source = {t.user_attrs["source"]: t for t in selection.trials}
    assert set(seeds) <= set(by_source)
    assert all(by_source[name].user_attrs["search_trial"] == t.number for name, t in seeds.items())
    assert sorted(len(t.intermediate_values) for t in selection.trials)[-1] == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in selection.trials)
    assert sum(t.state == TrialState.PRUNED for t in selection.trials) >= len(selection.trials) // 2
    assert {t.user_attrs["macs"] for t in selection.trials} <= {t.user_attrs["macs"] for t in trials}
    ranked = read_csv(run_dir / "selection.csv")
    assert [int(r["rank"]) for r in ranked] == list(range(1, len(selection.trials) + 1))
    assert ranked[0]["state"] == "COMPLETE" and ranked[-1]["state"] == "PRUNED"

    # --retrain-top-k 1: the selection's finalists (its best and any tied with it), retrained for one epoch
    # each; the best retrained is exported
    chosen = [t.user_attrs["search_trial"] for t in finalists(selection_result(selection), 1)]
    assert chosen[0] == int(ranked[0]["search_trial"])
    assert retrained_dirs(run_dir) == sorted(run_dir / "retrain" / f"trial_{n}" for n in chosen)
    history = {n: torch.load(run_dir / "retrain" / f"trial_{n}" / "last.pth", map_location="cpu", weights_only=True)
               for n in chosen}
    assert all(checkpoint["epoch"] == 1 for checkpoint in history.values())
    val_top1 = {n: checkpoint["history"][-1]["val_top1"] for n, checkpoint in history.items()}
    best = study.trials[max(chosen, key=val_top1.get)]
    config = json.loads((run_dir / "export" / "best" / "config.json").read_text())
    assert config["nasloc"]["trial"] == best.number
    assert config["nasloc"]["retrained_top1"] == pytest.approx(val_top1[best.number])
    assert config["nasloc"]["params"] == best.user_attrs["params"]  # counted at the deploy size, as the search

    summary = (run_dir / "summary.md").read_text()
    assert "6 trials (6 complete" in summary
    megabytes = sum(p.stat().st_size for p in run_dir.rglob("*")
                    if p.is_file() and p.name not in ("summary.md", "plan.json")) / 1e6
    assert f"its folder holds {megabytes:.0f} MB (checkpoints kept: needed)" in summary
    # the plan printed at the start, against what each phase took
    planned = json.loads((run_dir / "plan.json").read_text())
    assert set(planned["planned"]) == {"supernet", "search", "selection", "retrain", "export"} <= set(planned["took"])
    assert "## Plan against actual" in summary and "| selection |" in summary.split("## Plan against actual")[1]
    # the result first: the export, seed design or searched, its top-1 with two standard errors, the next command
    result = summary.split("## Result")[1].split("\n## ")[0]
    design = best.user_attrs.get("seed_design")
    assert f"Exported: search trial {best.number}, " in result
    assert (f"the {design} seed design" if design else "an arch the search found") in result
    assert f"retrained top-1 **{val_top1[best.number]:.2f} %**" in result and "two standard errors" in result
    assert f"nasloc train --model {run_dir / 'export' / 'best'}" in result and (run_dir / "arch.svg").is_file()
    retrained_table = summary.split("## Retrained from scratch")[1].split("\n## ")[0]
    rows = [line for line in retrained_table.splitlines() if line.startswith("| ") and line[2:3] in "wt "]
    assert [float(row.split(" | ")[3]) for row in rows] == sorted((round(v, 2) for v in val_top1.values()),
                                                                   reverse=True)  # sorted, the winner first
    for n in chosen:  # each finalist, and which seed design it is (or "searched")
        row = next(line for line in rows if line.split(" | ")[1] == str(n))
        assert row.split(" | ")[2:4] == [study.trials[n].user_attrs.get("seed_design", "searched"),
                                         f"{val_top1[n]:.2f}"]
        assert row.startswith("| winner |") == (n == best.number)
    # the selection's first (which the retrain step need not confirm: the best retrained is exported)
    assert "## Selection" in summary and f"| 1 | {ranked[0]['source']} | {ranked[0]['search_trial']} |" in summary
    for t in front:
        assert f"| {t.number} | {t.user_attrs['top1']:.2f} |" in summary
        assert locality(Arch.from_dict(t.user_attrs["arch"])) in summary  # which locality each Pareto arch uses
    assert f'timm.create_model("local-dir:{run_dir / "export" / "best"}", pretrained=True)' in summary


def test_the_export_reloads_with_timm_and_gives_the_retrained_logits(finished):
    import timm
    from safetensors.torch import load_file

    retrained = exported_dir(finished)
    arch = nasloc.Arch.from_dict(json.loads((retrained / "arch.json").read_text()))
    reference = nasloc.LocalityViT(arch)
    reference.load_state_dict(load_file(str(retrained / "best.safetensors")))
    exported = timm.create_model(f"local-dir:{finished / 'export' / 'best'}", pretrained=True)
    assert exported.arch == arch
    x = torch.randn(4, 3, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference.eval()(x), exported.eval()(x)
    assert got.shape == (4, 10)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_nasloc_export_needs_nothing_but_what_the_run_wrote(finished, tmp_path):
    """``nasloc export`` of the retrained trial gives export/best's weights; of any other trial, the
    subnet of the supernet (rebuilt from the run's record and checkpoint)."""
    from safetensors.torch import load_file

    from nasloc.deploy.export import export_trial

    retrained = exported_dir(finished)
    number = int(retrained.name.split("_")[1])
    others = {int(d.name.split("_")[1]) for d in retrained_dirs(finished)}  # retrained too: their own weights
    other = next(t.number for t in load_study(finished).trials if t.number not in others)
    folder = export_trial(finished, number, tmp_path / "retrained")
    assert json.loads((folder / "config.json").read_text())["nasloc"]["weights"].startswith("retrained")
    best, again = load_file(str(finished / "export" / "best" / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert best.keys() == again.keys() and all(torch.equal(best[k], again[k]) for k in best)
    folder = export_trial(finished, other, tmp_path / "supernet")
    config = json.loads((folder / "config.json").read_text())
    assert config["nasloc"]["weights"].startswith("supernet") and config["num_classes"] == 10


def test_no_pareto_trial_is_over_budget_by_fvcore(finished):
    front = pareto_trials(load_study(finished), BUDGET)
    assert front
    for trial in front:
        arch = nasloc.Arch.from_dict(trial.user_attrs["arch"])
        macs = fvcore_macs(nasloc.LocalityViT(arch), arch.img_size)
        assert macs <= BUDGET, f"trial {trial.number}: fvcore counts {macs} MACs"
        assert macs == trial.user_attrs["macs"]  # the analytic count the constraint was set with


def test_rerunning_a_finished_run_adds_nothing_and_trains_nothing(finished, data_dir):
    watched = [finished / "supernet" / "last.pth", *(d / name for d in retrained_dirs(finished) for name in ("last.pth", "best.safetensors"))]
    before = {path: path.stat().st_mtime_ns for path in watched}
    retrain_epoch = {d: epoch_of(d / "last.pth") for d in retrained_dirs(finished)}
    trials_before = [(t.number, t.state, t.values) for t in load_study(finished).trials]

    assert run(args(finished.parent, data_dir)) == 0

    assert [(t.number, t.state, t.values) for t in load_study(finished).trials] == trials_before
    assert {path: path.stat().st_mtime_ns for path in watched} == before
    assert epoch_of(finished / "supernet" / "last.pth") == 0
    assert {d: epoch_of(d / "last.pth") for d in retrained_dirs(finished)} == retrain_epoch
    retrained = exported_dir(finished)
    number = int(retrained.name.split("_")[1])
    val_top1 = torch.load(retrained / "last.pth", map_location="cpu", weights_only=True)["history"][-1]["val_top1"]
    (row,) = [line for line in (finished / "summary.md").read_text().splitlines() if line.startswith("| winner |")]
    assert row.split(" | ")[1] == str(number) and row.split(" | ")[3] == f"{val_top1:.2f}"


def test_keep_checkpoints_all_keeps_every_checkpoint_as_written(tmp_path, data_dir):
    with one_thread():
        assert run(args(tmp_path, data_dir, "--keep-checkpoints", "all", trials=4, select_top_k=2)) == 0
    run_dir = run_dir_of(tmp_path)
    assert "optimizer" in checkpoint_keys(run_dir / "supernet" / "last.pth")
    candidates = list((run_dir / "selection").glob("trial_*"))
    assert candidates and all((c / "last.pth").is_file() for c in candidates)
    assert all("optimizer" in checkpoint_keys(d / "last.pth") for d in retrained_dirs(run_dir))


def test_dashboard_serves_the_study(finished):
    port = free_port()
    server = nasloc.report.dashboard.serve_dashboard(f"sqlite:///{finished / 'study.db'}", port)
    try:
        status, page = get(f"http://127.0.0.1:{port}/dashboard")
        assert status == 200 and b"<html" in page.lower()
        status, body = get(f"http://127.0.0.1:{port}/api/studies")
        assert status == 200
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == [STUDY_NAME, "selection"]  # the search and its selection
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------ resuming
def test_an_unfinished_study_continues_to_the_total_while_the_dashboard_serves_it(tmp_path, data_dir, monkeypatch):
    assert run(args(tmp_path, data_dir, trials=3, retrain_top_k=0)) == 0
    run_dir = run_dir_of(tmp_path)
    first = sorted(load_study(run_dir).trials, key=lambda t: t.number)
    assert [t.number for t in first] == [0, 1, 2]
    assert not (run_dir / "retrain").exists() and not (run_dir / "export").exists()  # --retrain-top-k 0

    answers = []
    serve = nasloc.report.dashboard.serve_dashboard

    def serve_and_ask(storage, port):  # the pipeline starts the dashboard; ask it while the run goes on
        server = serve(storage, port)
        answers.append(get(f"http://127.0.0.1:{port}/dashboard")[0])
        return server

    monkeypatch.setattr(nasloc.pipeline, "serve_dashboard", serve_and_ask)
    port = free_port()
    assert run(args(tmp_path, data_dir, "--dashboard", trials=6, retrain_top_k=0, dashboard_port=port)) == 0
    assert answers == [200]
    with pytest.raises(OSError):  # shut down with the run
        get(f"http://127.0.0.1:{port}/dashboard")

    trials = sorted(load_study(run_dir).trials, key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state in FINISHED_STATES for t in trials)
    assert [t.user_attrs["arch_json"] for t in trials[:3]] == [t.user_attrs["arch_json"] for t in first]
    assert len(read_csv(run_dir / "trials.csv")) == 6
    assert "6 trials" in (run_dir / "summary.md").read_text()


def test_a_budget_outside_the_space_exits_2_with_its_range_and_writes_nothing(tmp_path, data_dir, capsys):
    lo, hi = SearchSpace.load(SPACES_DIR / "tiny.yaml").macs_range()
    for budget in ("0.1M", "3M"):
        assert run(args(tmp_path / "results", data_dir, budget=budget)) == 2
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("run_search.py: error: ") and format_macs(lo) in err and format_macs(hi) in err
        assert "[nasloc]" not in out
    assert not (tmp_path / "results").exists()


def test_a_batch_larger_than_the_training_split_exits_2_and_writes_nothing(tmp_path, data_dir, capsys):
    # it used to end the supernet phase with the loader's traceback, after the run folder was written
    assert run(args(tmp_path / "results", data_dir, batch_size=100000)) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("run_search.py: error: --batch-size 100000: the training split has only ")
    assert "[nasloc]" not in out and not (tmp_path / "results").exists()


def test_a_taken_dashboard_port_exits_2_before_any_training(tmp_path, data_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run(args(tmp_path, data_dir, "--dashboard", dashboard_port=port, phase="supernet")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--dashboard-port {port}" in err
    assert not (run_dir_of(tmp_path) / "supernet").exists()


def test_phases_supernet_then_search_then_the_rest(tmp_path, data_dir, capsys):
    run_dir = run_dir_of(tmp_path)
    assert run(args(tmp_path, data_dir, phase="search")) == 2  # no supernet yet
    assert "--phase supernet" in capsys.readouterr().err

    assert run(args(tmp_path, data_dir, phase="supernet")) == 0
    checkpoint = run_dir / "supernet" / "last.pth"
    assert epoch_of(checkpoint) == 0
    queued = load_study(run_dir).trials  # the seed designs, queued once for every worker to come; none searched
    assert queued and all(t.state == TrialState.WAITING and "seed_design" in t.user_attrs for t in queued)
    mtime = checkpoint.stat().st_mtime_ns

    assert run(args(tmp_path, data_dir, phase="search")) == 0  # what each extra worker runs
    assert len(load_study(run_dir).trials) == 6
    assert not (run_dir / "summary.md").exists() and not (run_dir / "trials.csv").exists()

    assert run(args(tmp_path, data_dir, retrain_top_k=0)) == 0
    assert checkpoint.stat().st_mtime_ns == mtime
    assert len(load_study(run_dir).trials) == 6
    for name in ("trials.csv", "pareto.csv", "pareto.html", "summary.md"):
        assert (run_dir / name).is_file()


@pytest.mark.parametrize("changed, message", [
    ({"select_epochs": 2}, "--select-epochs 4 (now 2)"),
    ({"seed": 1}, "--seed 0 (now 1)"),
    ({"budget": "2M"}, "--budget 1e+06 (now 2e+06)"),
    ({"objectives": "top1,params"}, "--objectives top1,macs (now top1,params)"),
    ({"batch_size": 128}, "--batch-size 64 (now 128)"),  # a smaller one is allowed (out of memory)
])
def test_a_rerun_with_other_fixed_options_is_refused_in_one_line_and_keeps_the_record(changed, message, tmp_path,
                                                                                      data_dir, capsys):
    """A rerun resumes the supernet, study and selection made for the first options; with others it is refused
    before anything is written, while the options that may change (--trials, the retrain step) may."""
    run_dir = run_dir_of(tmp_path)
    assert run(args(tmp_path, data_dir, phase="supernet")) == 0
    record = (run_dir / "run.json").read_bytes()
    capsys.readouterr()
    assert run(args(tmp_path, data_dir, phase="supernet", run_name=run_dir.name, **changed)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "--run-name" in err, err
    assert (run_dir / "run.json").read_bytes() == record
    assert run(args(tmp_path, data_dir, phase="supernet", trials=9, retrain_top_k=3)) == 0


def _torchrun_rank(rank: int, port: int, argv: list[str], out: Path) -> None:
    # What torchrun would set; the pipeline and setup_distributed() read it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a forked child can't reuse the parent's OpenMP pool
    (out / f"status{rank}").write_text(str(run(argv)))


@pytest.mark.timeout(300)  # a rendezvous that never completes must fail the test, not hang CI
def test_torchrun_supernet_phase_queues_the_seed_designs_once_and_serves_one_dashboard(tmp_path, data_dir):
    """Every rank trains the supernet; only rank 0 writes the record, serves the dashboard and queues the
    seed designs (two ranks would race for the port and queue every seed design twice)."""
    argv = args(tmp_path, data_dir, "--dashboard", phase="supernet", dashboard_port=free_port())
    torch.multiprocessing.start_processes(_torchrun_rank, args=(free_port(), argv, tmp_path), nprocs=2,
                                          daemon=True, start_method="fork")
    assert [(tmp_path / f"status{rank}").read_text() for rank in range(2)] == ["0", "0"]
    run_dir = run_dir_of(tmp_path)
    queued = [t.user_attrs["seed_design"] for t in load_study(run_dir).trials]
    assert queued and len(queued) == len(set(queued)), queued
    assert (run_dir / "run.json").is_file() and epoch_of(run_dir / "supernet" / "last.pth") == 0


# -------------------------------------------------------------------------------- workers and Ray
def test_workers_are_processes_sharing_the_study(tmp_path, data_dir, capsys, monkeypatch):
    run_dir = run_dir_of(tmp_path)
    me = f"{socket.gethostname()}:{os.getpid()}"
    make_evaluator = nasloc.supernet.proxy.make_evaluator

    def patient_evaluator(*a, **kw):
        """This process's first evaluation waits for the spawned worker to take a trial (its start-up,
        imports included, takes longer than this process needs for all the trials)."""
        evaluate = make_evaluator(*a, **kw)

        deadline = time.time() + 180

        def wait_then_evaluate(arch):
            while time.time() < deadline and not any(t.user_attrs.get("worker") not in (None, me) for t in load_study(run_dir).trials):
                time.sleep(0.5)
            return evaluate(arch)

        return wait_then_evaluate

    monkeypatch.setattr(nasloc.phases.search, "make_evaluator", patient_evaluator)
    # --supernet-epochs 0: the spawned worker loads the untrained weights from supernet/untrained.pth
    assert run(args(tmp_path, data_dir, workers=2, trials=8, supernet_epochs=0, retrain_top_k=0)) == 0
    out = capsys.readouterr().out
    assert "2 processes at a time" in out and "warning" not in out
    assert "2 trainings at a time" in out and (run_dir / "selection.csv").is_file()  # the selection's RungPool
    assert (run_dir / "supernet" / "untrained.pth").is_file() and not (run_dir / "supernet" / "last.pth").exists()
    trials = load_study(run_dir).trials
    counted = [t for t in trials if t.state != TrialState.PRUNED]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.PRUNED)  # lost the race for the last
    assert len(counted) == 8 and all(t.state in FINISHED_STATES for t in counted)
    assert len({t.number for t in trials}) == len(trials)
    workers = {t.user_attrs["worker"] for t in counted}
    assert len(workers) == 2 and me in workers


def test_ray_backend_with_latency(tmp_path, data_dir):
    pytest.importorskip("ray")
    # A budget near the top of the space, so that the trials are evaluated (and timed) by the Ray worker;
    # --supernet-epochs 0, so that the worker loads supernet/untrained.pth.
    argv = args(tmp_path, data_dir, "--backend", "ray", trials=2, budget="2.6M", supernet_epochs=0, retrain_top_k=0,
                objectives="top1,macs,latency", select_epochs=2)
    assert run(argv) == 0
    run_dir = run_dir_of(tmp_path, "2.6M")
    study = load_study(run_dir)
    assert study.metric_names == ["top1", "macs", "latency"]
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.number for t in trials] == [0, 1]
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["backend"] == "ray" for t in trials)
    evaluated = [t for t in trials if t.user_attrs["evaluated"]]
    assert evaluated, "no trial within the 2.6M budget"
    for t in evaluated:
        assert 0 <= t.user_attrs["top1"] <= 100 and t.user_attrs["latency"] > 0
        assert t.values == [t.user_attrs["top1"], t.user_attrs["macs"], t.user_attrs["latency"]]
    assert len(read_csv(run_dir / "trials.csv")) == 2 and (run_dir / "summary.md").is_file()
    # the selection ran on Ray (ASHA over rungs 1 and 2): every candidate scored after 1 epoch, the ones ASHA
    # let through after 2 (COMPLETE), the others PRUNED; the scores reached the study through the driver
    selection = optuna.load_study(study_name="selection", storage=open_storage(run_dir / "study.db"))
    assert selection.trials and all(1 in t.intermediate_values for t in selection.trials)
    assert {t.state for t in selection.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert any(t.state == TrialState.COMPLETE and set(t.intermediate_values) == {1, 2} for t in selection.trials)
    assert (run_dir / "ray").is_dir() and len(read_csv(run_dir / "selection.csv")) == len(selection.trials)
