"""nasloc train, evaluate and presets, end to end on digits (and small fake CIFAR / ImageFolder sets) with
tiny models and 1-epoch trainings: every form of --model, the export reloading with timm at 224 px and as
trained, evaluate reproducing the recorded val and test top-1 exactly, resume after kill -9, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import nasloc  # noqa: F401  (registers the family with timm)
from nasloc.arch import Arch, Block, Stage
from nasloc.cli import arguments
from nasloc.cli import main as cli
from nasloc.cli.main import main
from nasloc.models import LocalityViT
from nasloc.models.presets import PAPERS, PRESETS
from nasloc.run import RunDir, RunOptions, RunRecord
from nasloc.space.flops import count
from nasloc.training.recipe import RetrainConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[2]
# A tiny pyramid at its deploy resolution, 224 px, with both resolution-dependent weights (an absolute
# position embedding, window tables); trained at 32 px it has 4x4 windows there and 7x7 at 224.
ARCH = Arch(
    stages=(Stage(16, 2, 2.0, (Block("window"), Block(ffn_kernel=3))), Stage(32, 2, 2.0, (Block("window"),))),
    img_size=224, num_classes=10, patch_size=8, pos_embed="absolute", cls_token=False, head="avg",
    global_tokens=2, window=7,
)
FAST = ["--epochs", "1", "--img-size", "32", "--workers", "0", "--batch-size", "64"]
QUICK_EVAL = ["--throughput-batch", "2", "--json"]


def _arch_file(folder: Path, arch: Arch = ARCH) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(arch.to_yaml())
    return path


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _config(export: Path) -> dict:
    return json.loads((export / "config.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``nasloc train`` of the tiny arch on digits, 1 epoch at 32 px; its folder."""
    folder = tmp_path_factory.mktemp("train")
    assert main(["train", "--model", str(_arch_file(folder)), "--out", str(folder / "out"), *FAST]) == 0
    return folder / "out"


# ------------------------------------------------------------------------------------------------ train
def test_train_writes_checkpoint_record_and_export(trained: Path) -> None:
    assert {"export", "last.pth", "train.json"} <= {p.name for p in trained.iterdir()}
    config = _config(trained / "export")
    assert config["model_args"] == ARCH.to_dict()  # the arch at its deploy resolution
    block = config["nasloc"]
    assert block["train_img_size"] == 32 and block["epochs"] == 1 and block["dataset"] == "digits"
    assert 0 <= block["val_top1"] <= 100 and block["test_top1"] is None  # digits has no test split
    assert block["recipe"]["mixup"] == 0.8 and block["recipe"]["img_size"] == 32
    history = torch.load(trained / "last.pth", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1] and history[-1]["val_top1"] == block["val_top1"]


def test_the_export_reloads_with_timm_at_224_and_as_trained(trained: Path) -> None:
    folder = trained / "export"
    at_224 = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    at_32 = timm.create_model(f"local-dir:{folder}", pretrained=True, img_size=32).eval()
    assert at_224.arch == ARCH and at_32.arch == ARCH.replace(img_size=32)
    with torch.no_grad():
        assert at_224(torch.randn(1, 3, 224, 224)).shape == (1, 10)
        assert at_32(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_evaluate_reproduces_the_recorded_val_accuracy_exactly(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--model", str(trained / "export"), *QUICK_EVAL]) == 0
    numbers = _json_line(capsys.readouterr().out)
    assert numbers["img_size"] == 32  # where the weights were trained
    assert numbers["top1"] == _config(trained / "export")["nasloc"]["val_top1"]
    assert numbers["top1"] <= numbers["top5"] <= 100
    assert numbers["params"] == count(ARCH.replace(img_size=32)).params
    assert numbers["macs"] == count(ARCH.replace(img_size=32)).macs
    assert numbers["latency_ms"] > 0 and numbers["throughput_img_per_s"] > 0
    assert main(["evaluate", "--model", str(trained), *QUICK_EVAL]) == 0  # the folder train --out wrote
    assert _json_line(capsys.readouterr().out)["top1"] == numbers["top1"]


def test_evaluate_prints_a_table(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--model", str(trained / "export"), "--throughput-batch", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("top-1", "top-5", "params", "MACs", "latency", "throughput"):
        assert label in out
    assert "multiply-adds" in out and "at 32 px" in out


def test_train_takes_an_export_and_a_preset(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An export's arch trains from scratch (at the resolution given); so does a preset's."""
    assert main(["train", "--model", str(trained / "export"), "--out", str(tmp_path / "again"), *FAST]) == 0
    assert _config(tmp_path / "again" / "export")["model_args"] == ARCH.to_dict()
    small = ["--epochs", "1", "--img-size", "16", "--workers", "0", "--batch-size", "64", "--mixup", "0",
             "--cutmix", "0", "--randaugment", ""]
    assert main(["train", "--model", "nasloc_deit_tiny", "--out", str(tmp_path / "deit"), *small]) == 0
    config = _config(tmp_path / "deit" / "export")
    assert config["model_args"] == PRESETS["nasloc_deit_tiny"].replace(num_classes=10).to_dict()
    assert config["nasloc"]["train_img_size"] == 16


def test_resume_after_kill_9(tmp_path: Path) -> None:
    """Killed after its first epoch's checkpoint, the same command continues from it."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nasloc", "train", "--model", str(_arch_file(tmp_path)), "--out", str(out),
               "--epochs", "4", "--img-size", "32", "--workers", "0", "--batch-size", "64"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "last.pth").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    before = torch.load(out / "last.pth", weights_only=True)["history"]
    assert 1 <= len(before) < 4 and not (out / "export").exists()

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out / 'last.pth'}" in again.stdout
    assert f"resumed after epoch {len(before)}, trained {4 - len(before)} more" in again.stdout
    after = torch.load(out / "last.pth", weights_only=True)["history"]
    assert [h["epoch"] for h in after] == [1, 2, 3, 4] and after[: len(before)] == before
    assert _config(out / "export")["nasloc"]["val_top1"] == after[-1]["val_top1"]


# --------------------------------------------------------------------------------------- test splits
def _fake_cifar(root: Path, per_batch: int = 20, test: int = 40) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, content: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)

    for i, n in enumerate([per_batch] * 5 + [test]):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        write(name, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [j % 10 for j in range(n)]})
    write("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)]})
    return folder


def test_cifar_test_split_is_recorded_and_reproduced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _fake_cifar(tmp_path)
    out = tmp_path / "out"
    fast = ["--epochs", "1", "--img-size", "32", "--workers", "0", "--batch-size", "32"]
    common = ["--dataset", "cifar10", "--data-dir", str(data)]
    assert main(["train", "--model", str(_arch_file(tmp_path)), "--out", str(out), *common, *fast]) == 0
    recorded = _config(out / "export")["nasloc"]
    capsys.readouterr()
    for split, key in (("test", "test_top1"), ("val", "val_top1")):
        assert main(["evaluate", "--model", str(out / "export"), *common, "--split", split, *QUICK_EVAL]) == 0
        numbers = _json_line(capsys.readouterr().out)
        assert numbers["top1"] == recorded[key] and numbers["images"] == (40 if split == "test" else 10)


def _image_folder(root: Path, splits: tuple[str, ...]) -> Path:
    for split in splits:
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (60 * i, 100 if c == "a" else 200, 30)).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_test_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _image_folder(tmp_path / "data", ("train", "test"))
    args = ["evaluate", "--model", str(_arch_file(tmp_path)), "--dataset", "imagefolder", "--data-dir", str(data),
            "--img-size", "32", "--split", "test", *QUICK_EVAL]
    assert main(args) == 0
    numbers = _json_line(capsys.readouterr().out)
    assert numbers["images"] == 8 and numbers["kind"] == "arch file"


# ------------------------------------------------------------------------------------ other models
def _make_run(run: Path, trained: LocalityViT) -> None:
    """A run folder whose study holds trial 0 (the tiny arch), retrained at 32 px."""
    options = RunOptions(budget=1e6, space="tiny", storage=str(run / "study.log"), results_dir=run.parent,
                         run_name=run.name)
    run.mkdir()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / "study.log")))
    study = optuna.create_study(study_name="nasloc", storage=storage, directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[50.0, 1.0], user_attrs=dict(arch=ARCH.to_dict(), top1=50.0)))
    RunDir(run).write_record(RunRecord(options, 10, (0.5,) * 3, (0.25,) * 3))
    folder = RunDir(run)
    folder.retrain_dir(0).mkdir(parents=True)
    save_file(trained.state_dict(), str(folder.retrained_weights(0)))
    folder.write_retrained_arch(0, trained.arch)
    torch.save(dict(history=[dict(epoch=1, val_top1=12.5)]), folder.retrain_checkpoint(0))


def test_run_trial_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    retrained = LocalityViT(ARCH.replace(img_size=32)).eval()
    _make_run(tmp_path / "run", retrained)
    assert main(["evaluate", "--model", f"{tmp_path / 'run'}:0", *QUICK_EVAL]) == 0
    numbers = _json_line(capsys.readouterr().out)
    assert numbers["kind"] == "trial" and numbers["img_size"] == 32  # where its weights were retrained
    assert main(["train", "--model", f"{tmp_path / 'run'}:0", "--out", str(tmp_path / "out"), *FAST]) == 0
    assert _config(tmp_path / "out" / "export")["model_args"] == ARCH.to_dict()


@pytest.mark.parametrize("name", ["resnet18", "deit_tiny_patch16_224"])
def test_evaluate_a_timm_model(name: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--model", name, "--img-size", "32", *QUICK_EVAL]) == 0
    numbers = _json_line(capsys.readouterr().out)
    model = timm.create_model(name, num_classes=10, **({"img_size": 32} if name.startswith("deit") else {}))
    assert numbers["kind"] == "timm" and numbers["params"] == sum(p.numel() for p in model.parameters())
    assert numbers["macs"] > 0 and 0 <= numbers["top1"] <= 100


def test_presets_lists_every_preset_with_its_numbers(capsys: pytest.CaptureFixture) -> None:
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert set(PRESETS) == set(timm.list_models("nasloc_*")) - {"nasloc_vit"} == set(PAPERS)
    for name, arch in PRESETS.items():
        cost = count(arch)
        (line,) = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert PAPERS[name] in line and f"{cost.params / 1e6:.2f}" in line and f"{cost.macs / 1e9:.2f}" in line
        assert f"{arch.img_size} px" in line


def test_readme_documents_every_option_of_train_and_evaluate() -> None:
    """Every flag of nasloc train and nasloc evaluate is documented in docs/train-and-evaluate.md, in its own
    section, which the README links."""
    assert "(docs/train-and-evaluate.md)" in (REPO / "README.md").read_text()
    guide = (REPO / "docs" / "train-and-evaluate.md").read_text()
    for command in ("train", "evaluate"):
        section = guide.split(f"## `nasloc {command}`", 1)[1].split("\n## ", 1)[0]
        sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
        flags = {flag for action in sub._actions for flag in action.option_strings if flag.startswith("--")}
        assert flags - {"--help"}
        assert not [flag for flag in flags - {"--help"} if f"`{flag}`" not in section], command


def test_the_recipe_defaults_are_retrain_configs() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(RetrainConfig)}
    assert arguments.RECIPE == {name: defaults[name] for name in arguments.RECIPE}
    args = cli.build_parser().parse_args(["train", "--model", "m", "--epochs", "1"])
    assert args.workers == defaults["num_workers"] and {name: getattr(args, name) for name in arguments.RECIPE} == arguments.RECIPE


# ------------------------------------------------------------------------------------------ bad input
def _snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", [
    "unknown model", "unknown model (train takes no timm names)", "arch file that is no arch",
    "arch file that is no YAML", "missing split",
    "run folder that does not exist", "trial that does not exist", "out exists", "out holds a finished training",
    "out holds another training", "img size the arch cannot take", "randaugment spec timm refuses",
    "label smoothing of 1", "ema decay of 1", "drop path of 1", "resume with another drop path"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, trained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "notes.txt").write_text("mine")
    (tmp_path / "bad.yaml").write_text("stages: 3\n")
    (tmp_path / "broken.yaml").write_text("stages: [unclosed\n")
    _make_run(tmp_path / "run", LocalityViT(ARCH.replace(img_size=32)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.json").write_text(json.dumps({"model": "another_model"}))
    unfinished = tmp_path / "unfinished"  # the trained folder's record, before its export was written
    unfinished.mkdir()
    (unfinished / "train.json").write_text((trained / "train.json").read_text())
    earlier = json.loads((trained / "train.json").read_text())
    train = ["train", "--epochs", "1", "--workers", "0"]
    args, message = {
        "unknown model": (["evaluate", "--model", "no_such_model"], "--model 'no_such_model': no such model"),
        "unknown model (train takes no timm names)": (train + ["--model", "resnet18", "--out", str(tmp_path / "o")],
                                                      "no such model"),
        "arch file that is no arch": (["evaluate", "--model", str(tmp_path / "bad.yaml")], "not an arch file"),
        "arch file that is no YAML": (train + ["--model", str(tmp_path / "broken.yaml")], "not an arch file"),
        "missing split": (["evaluate", "--model", "nasloc_deit_tiny", "--split", "test"], "digits has no test split"),
        "run folder that does not exist": (["evaluate", "--model", "no/such/run:3"], "no such run folder"),
        "trial that does not exist": (["evaluate", "--model", f"{tmp_path / 'run'}:7"], "trial 7 does not exist"),
        "out exists": (train + ["--model", "nasloc_deit_tiny", "--out", str(tmp_path / "existing")],
                       "already exists and is not a nasloc train folder"),
        "out holds a finished training": (train + ["--model", "nasloc_deit_tiny", "--out", str(trained)],
                                          "holds a finished training"),
        "out holds another training": (train + ["--model", "nasloc_deit_tiny", "--img-size", "32", "--out", str(other)],
                                       "holds another training (different model, arch"),
        "img size the arch cannot take": (["evaluate", "--model", "nasloc_deit_tiny", "--img-size", "40"],
                                          "--img-size 40"),
        "randaugment spec timm refuses": (train + ["--model", "nasloc_deit_tiny", "--img-size", "32", "--out",
                                                   str(tmp_path / "o"), "--randaugment", "bogus"],
                                          "--randaugment 'bogus': not a timm RandAugment spec"),
        "label smoothing of 1": (train + ["--model", "m", "--label-smoothing", "1"], "expected a number >= 0 and < 1"),
        "ema decay of 1": (train + ["--model", "m", "--ema-decay", "1"], "expected a number >= 0 and < 1"),
        "drop path of 1": (train + ["--model", "m", "--drop-path", "1.5"], "expected a number >= 0 and < 1"),
        "resume with another drop path": (train + ["--model", earlier["model"], "--img-size", "32", "--batch-size", "64",
                                                   "--drop-path", "0.2", "--out", str(unfinished)],
                                          "holds another training (different drop_path)"),
    }[case]
    before, before_trained = _snapshot(tmp_path), _snapshot(trained)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert _snapshot(tmp_path) == before and _snapshot(trained) == before_trained


def test_help_and_bad_usage_load_no_torch() -> None:
    code = ("import sys\n"
            "from nasloc.cli.main import main\n"
            "for argv in (['train', '--help'], ['evaluate', '--help'], ['presets', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert main(['train', '--model', 'x']) == 2\n"  # --epochs is required
            "assert main(['evaluate', '--model', 'x', '--dataset', 'cifar10']) == 2\n"  # needs --data-dir
            "heavy = {name.split('.')[0] for name in sys.modules} & {'torch', 'timm', 'optuna', 'numpy'}\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
