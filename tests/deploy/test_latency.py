"""The latency table: parts of archs and spaces, built once and reused, predictions, the latency budget of a search,
and ``nasloc latency``."""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import optuna
import pytest
import torch

import nasloc.deploy.latency
from nasloc.arch import Arch, Block, Shortcut, Stage
from nasloc.cli.main import main, search_main
from nasloc.deploy.latency import LatencyError, LatencyFactory, LatencyModel, LatencyTable, Target, build_latency_model
from nasloc.deploy.latency_parts import arch_parts, probe, space_parts, split_key
from nasloc.report.tables import trial_rows
from nasloc.run import STUDY_NAME
from nasloc.search.budget import LatencyBudget
from nasloc.search.engine import run_search
from nasloc.search.objective import CONSTRAINT, LATENCY_CONSTRAINT
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.storage.factory import open_storage


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "latency"
    monkeypatch.setenv("NASLOC_LATENCY_DIR", str(folder))
    return folder


def _fake_time_us(module: torch.nn.Module, x: torch.Tensor) -> float:
    """A deterministic stand-in device: a part costs its weights and its input, in microseconds."""
    return 1.0 + sum(p.numel() for p in module.parameters()) / 100 + x.numel() / 10


# ------------------------------------------------------------------------------------------- parts
@pytest.mark.parametrize("name", ["tiny", "tiny_columnar", "cifar", "imagenet"])
def test_the_parts_of_a_space_cover_every_arch_of_it(name: str) -> None:
    space = SearchSpace.load(name)
    parts = space_parts(space)
    rng = random.Random(0)
    for _ in range(50):
        assert set(arch_parts(space.sample(rng))) <= parts


def test_a_block_is_its_halves_around_the_base() -> None:
    block = Block(mixer="dilated", dilations=(2, 1), life=True, ffn_kernel=3)
    arch = Arch(stages=(Stage(24, 2, 2.0, (block, block)),), img_size=16, patch_size=2, cpe=True, cls_token=False,
                head="avg", num_classes=10, shortcuts=(Shortcut(start=0, span=2, kernels=(3, 5)),))
    kinds: dict[str, int] = {}
    for key, times in arch_parts(arch).items():
        kind, fields = split_key(key)
        label = kind if kind != "block" else ("base" if fields["heads"] == 1 and not fields["cpe"] and not fields["ffn_kernel"]
                                              else "cpe" if fields["cpe"] else "ffn" if fields["ffn_kernel"] else "attention")
        kinds[label] = kinds.get(label, 0) + times
        if label == "attention":
            assert fields["dilations"] == [1, 2]  # heads of equal rate run together: sorted
    # per block: attention + ffn + cpe - 2 base
    assert kinds == {"stem": 1, "head": 1, "shortcut": 1, "attention": 2, "ffn": 2, "cpe": 2, "base": -4}


def test_every_probe_runs_its_part() -> None:
    space = SearchSpace.load("tiny")
    keys = sorted(space_parts(space))
    by_kind: dict[str, str] = {}
    for key in keys:
        by_kind.setdefault(split_key(key)[0], key)
    for kind, key in by_kind.items():
        module, x = probe(key, batch_size=2)
        with torch.inference_mode():
            assert module(x).shape[0] == 2, kind


# ------------------------------------------------------------------------------------------- table
def test_the_table_is_built_once_then_reused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = SearchSpace.load("tiny_columnar")
    model, table = build_latency_model(space, Target(), progress=False)
    assert set(table.parts) == space_parts(space) and all(t > 0 for t in table.parts.values())
    assert table.path.parent == cache and table.path.is_file()
    stored = json.loads(table.path.read_text())
    assert stored["device"] and stored["versions"]["torch"] == torch.__version__ and stored["batch_size"] == 1
    assert stored["img_size"] == space.img_size and stored["threads"] == torch.get_num_threads()
    assert "tiny_columnar-10classes" in stored["fits"]

    def measuring(*args, **kwargs):
        raise AssertionError("a second run measured something")

    timers = {name: getattr(nasloc.deploy.latency, name) for name in ("probe", "measure_archs_us")}
    monkeypatch.setattr(nasloc.deploy.latency, "probe", measuring)
    monkeypatch.setattr(nasloc.deploy.latency, "measure_archs_us", measuring)
    again, _ = build_latency_model(space, Target(), progress=False)
    assert again == model
    arch = space.sample(random.Random(1))
    assert again.predict_us(arch) == pytest.approx(model.parts_us(arch) + model.constant_us)
    assert LatencyFactory("tiny_columnar")()(arch) == pytest.approx(model.predict_us(arch) / 1000)
    # another batch size is another table; a worker process with fewer threads reads the table of the driver's
    assert LatencyTable.open(Target(batch_size=4), space.img_size).path != table.path
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert LatencyTable.open(Target(threads=threads), space.img_size).path == table.path
        assert LatencyFactory("tiny_columnar", threads=threads)() == model
    finally:
        torch.set_num_threads(threads)
    # another class count shares the table (its own head part added) but fits a constant of its own
    for name, timer in timers.items():
        monkeypatch.setattr(nasloc.deploy.latency, name, timer)
    build_latency_model(space.for_classes(7), Target(), progress=False)
    assert {"tiny_columnar-10classes", "tiny_columnar-7classes"} <= set(json.loads(table.path.read_text())["fits"])


def test_a_prediction_is_its_parts_summed_plus_the_constant() -> None:
    space = SearchSpace.load("tiny")
    arch = space.sample(random.Random(2))
    parts = {key: float(i + 1) for i, key in enumerate(sorted(space_parts(space)))}
    model = LatencyModel(parts, constant_us=7.0)
    expected = sum(times * parts[key] for key, times in arch_parts(arch).items()) + 7.0
    assert model.predict_us(arch) == pytest.approx(expected)
    assert pickle.loads(pickle.dumps(model)).predict_us(arch) == model.predict_us(arch)
    with pytest.raises(LatencyError, match="nasloc latency --space") as err:
        LatencyModel({}).predict_us(arch)
    assert "\n" not in str(err.value)


def test_the_onnxruntime_backend_is_cpu_only() -> None:
    with pytest.raises(LatencyError, match="--device cpu"):
        Target("cuda", "onnxruntime")
    with pytest.raises(LatencyError, match="torch, onnxruntime"):
        Target("cpu", "tvm")


# ------------------------------------------------------------------------------------------- search
def _tiny_space_with_fake_table(monkeypatch: pytest.MonkeyPatch) -> tuple[SearchSpace, LatencyModel, list[Arch]]:
    """The tiny space, its latency table from fake timings, and 40 of its archs."""
    monkeypatch.setattr(Target, "time_us", lambda self, module, x: _fake_time_us(module, x))
    space = SearchSpace.load("tiny")
    model, _ = build_latency_model(space, Target(), progress=False)
    rng = random.Random(0)
    return space, model, [space.sample(rng) for _ in range(40)]


def test_a_latency_budget_search_evaluates_nothing_over_either_budget(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space, model, archs = _tiny_space_with_fake_table(monkeypatch)
    budget_macs = sorted(count(a).macs for a in archs)[30]
    limit = sorted(model(a) for a in archs)[15]  # about half the archs within each budget
    evaluated: list[Arch] = []
    study = run_search(space, lambda arch: evaluated.append(arch) or 50.0, budget_macs=budget_macs,
                       storage=f"sqlite:///{cache.parent / 'study.db'}", study_name="s", n_trials=16, sampler="nsga2",
                       objectives=("top1", "latency"), latency=model, latency_budget=LatencyBudget(limit, model),
                       progress=False, population_size=8)
    assert evaluated and all(count(a).macs <= budget_macs and model(a) <= limit for a in evaluated)
    for trial in study.trials:
        assert set(trial.constraints) == {CONSTRAINT, LATENCY_CONSTRAINT}
        assert trial.constraints[LATENCY_CONSTRAINT] == pytest.approx(trial.user_attrs["latency"] - limit)
        if trial.user_attrs["evaluated"]:
            assert trial.values[1] == pytest.approx(trial.user_attrs["latency"])
    assert study.user_attrs["latency_budget_ms"] == limit
    with pytest.raises(ValueError, match="latency budget"):  # a resumed study keeps its budgets
        run_search(space, lambda arch: 50.0, budget_macs=budget_macs, storage=f"sqlite:///{cache.parent / 'study.db'}",
                   study_name="s", n_trials=16, objectives=("top1", "latency"), latency=model, progress=False)


def test_trials_csv_counts_a_trial_over_the_latency_budget_as_infeasible(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space, model, archs = _tiny_space_with_fake_table(monkeypatch)
    budget_macs = max(count(a).macs for a in archs)
    limit = sorted(model(a) for a in archs)[1]  # so tight that the sampler's draws cannot all keep it
    study = run_search(space, lambda arch: 50.0, budget_macs=budget_macs, storage=f"sqlite:///{cache.parent / 't.db'}",
                       study_name="t", n_trials=12, sampler="random", objectives=("top1", "latency"), latency=model,
                       latency_budget=LatencyBudget(limit, model), progress=False)
    trials = sorted(study.trials, key=lambda t: t.number)
    feasible = [r["feasible"] for r in trial_rows(study, budget_macs)]
    assert feasible == [t.user_attrs["macs"] <= budget_macs and t.user_attrs["latency"] <= limit for t in trials]
    assert any(t.user_attrs["macs"] <= budget_macs and not ok for t, ok in zip(trials, feasible))


def test_run_search_py_with_a_latency_budget_on_digits(tmp_path: Path, cache: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    space = SearchSpace.load("tiny")
    model = LatencyFactory("tiny", num_classes=10)()  # the table the run will reuse
    rng = random.Random(0)
    limit = sorted(model(space.sample(rng)) for _ in range(30))[10]
    argv = ["--space", "tiny", "--budget", "1M", "--latency-budget", f"{limit}ms", "--supernet-epochs", "0",
            "--trials", "6", "--select-top-k", "0", "--retrain-top-k", "0", "--results-dir", str(tmp_path),
            "--device", "cpu"]
    assert search_main(argv) == 0, capsys.readouterr().err
    run_dir = tmp_path / "tiny-digits-1M"
    assert json.loads((run_dir / "run.json").read_text())["latency_budget"] == limit
    study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(f"sqlite:///{run_dir / 'study.db'}"))
    assert len(study.trials) == 6
    for trial in study.trials:
        arch = Arch.from_dict(trial.user_attrs["arch"])
        if trial.user_attrs["evaluated"]:
            assert count(arch).macs <= 1e6 and model(arch) <= limit
        assert trial.user_attrs["latency"] == pytest.approx(model(arch))


@pytest.mark.parametrize("text", ["5", "fast", "-2ms", "0us", "3s"])
def test_a_bad_latency_budget_is_one_line(text: str, capsys: pytest.CaptureFixture) -> None:
    assert search_main(["--budget", "1M", f"--latency-budget={text}"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "like 5ms, 0.5ms or 500us" in err


# ------------------------------------------------------------------------------------------- command
def test_nasloc_latency_reports_the_median_error_last(cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["latency", "--space", "tiny_columnar", "--archs", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("median absolute error: ") and lines[-1].endswith(" %")
    assert sum(1 for line in lines if line[:1].isdigit()) == 3  # one row per arch
    assert main(["latency", "--space", "no-such-space"]) == 2
