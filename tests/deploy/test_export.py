"""Export as a timm model folder: reload with identical logits, features_only, data config, training
through timm's own components, a fresh process, refusals that leave nothing behind, and trials of a real
Optuna study."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

import nasloc  # noqa: F401  (registers nasloc_vit with timm)
from nasloc.arch import Arch, Block, Shortcut, Stage
from nasloc.deploy.export import ExportError, export_arch, export_model, export_trial
from nasloc.errors import StorageError
from nasloc.models import LocalityViT
from nasloc.models.locality_vit import default_out_indices
from nasloc.models.presets import PRESETS
from nasloc.run import RunDir, RunOptions, RunRecord
from nasloc.space.files import resolve_space_path
from nasloc.space.flops import count
from nasloc.space.search_space import SearchSpace
from nasloc.storage.factory import open_storage
from nasloc.supernet.supernet import Supernet

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Every gene of the pyramid family: dilated heads, window attention with global tokens, LIFE, FFN convs,
# CPE, the BiDim FFN and two shortcuts (one spanning two blocks, one with a 7x7 kernel).
PYRAMID = Arch(
    stages=(
        Stage(12, 3, 2.0, (Block("dilated", (1, 2, 2)), Block("window", life=True, ffn_kernel=3))),
        Stage(24, 2, 2.0, (Block("global", ffn_kernel=5), Block("window"))),
    ),
    img_size=16, num_classes=5, patch_size=2, pos_embed="none", cls_token=False, head="avg",
    global_tokens=2, window=4, cpe=True, ffn="bidim",
    shortcuts=(Shortcut(0, 2, (3, 5)), Shortcut(3, 1, (7,))),
)
# The columnar family: class token, absolute position embedding, LocalViT FFN, token head.
COLUMNAR = Arch(
    stages=(Stage(24, 3, 2.0, (Block(ffn_kernel=3), Block("dilated", (1, 1, 2), ffn_kernel=3), Block(life=True, ffn_kernel=3))),),
    img_size=32, num_classes=7, patch_size=8, ffn="localvit", shortcuts=(Shortcut(1, 2, (3,)),),
)
ARCHS = {"pyramid": PYRAMID, "columnar": COLUMNAR}
DIGITS_MEAN, DIGITS_STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight, so zero-initialised biases and unit norms don't hide a load that went wrong."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(0.05 * torch.randn(value.shape, generator=gen))
    return model.eval()


def _inputs(arch: Arch, n: int = 2) -> torch.Tensor:
    return torch.randn(n, arch.in_chans, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(1))


def _reload(folder: Path, **kwargs) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs).eval()


def _leftovers(parent: Path) -> list[str]:
    """Temporary folders an export may have left (they all start with a dot)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module", params=sorted(ARCHS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch = ARCHS[request.param]
    model = _trained_like(LocalityViT(arch))
    folder = tmp_path_factory.mktemp("exports") / "results" / "run" / "export" / request.param
    info = dict(trial=3, proxy_top1=41.5, retrained_top1=77.25, budget=7e8)
    path = export_model(model, folder, info=info, mean=DIGITS_MEAN, std=DIGITS_STD, crop_pct=0.875)
    return arch, model, path


# ---------------------------------------------------------------------------------------- layout
def test_folder_layout_and_config(exported) -> None:
    arch, _model, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "arch.svg", "arch.yaml", "config.json",
                                                        "model.safetensors"]
    assert _leftovers(folder.parent) == []
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "nasloc_vit"
    assert config["num_classes"] == arch.num_classes
    assert config["model_args"] == arch.to_dict()
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, arch.img_size, arch.img_size]
    assert (cfg["mean"], cfg["std"], cfg["crop_pct"]) == (list(DIGITS_MEAN), list(DIGITS_STD), 0.875)
    assert cfg["interpolation"] == "bicubic"
    cost = count(arch)
    block = config["nasloc"]
    assert (block["macs"], block["params"]) == (cost.macs, cost.params)
    assert block["params"] == sum(p.numel() for p in LocalityViT(arch).parameters())
    assert {k: block[k] for k in ("trial", "proxy_top1", "retrained_top1", "budget")} == dict(
        trial=3, proxy_top1=41.5, retrained_top1=77.25, budget=7e8)
    assert Arch.from_yaml((folder / "arch.yaml").read_text()) == arch
    assert (folder / "arch.svg").read_text().startswith("<svg ")
    assert f"# {folder.name}\n" in (folder / "README.md").read_text()  # the model card
    assert set(load_file(str(folder / "model.safetensors"))) == set(LocalityViT(arch).state_dict())


# ---------------------------------------------------------------------------------------- reload
def test_round_trip_gives_identical_logits(exported) -> None:
    arch, model, folder = exported
    reloaded = _reload(folder)
    assert isinstance(reloaded, LocalityViT) and reloaded.arch == arch
    x = _inputs(arch)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_features_only(exported) -> None:
    arch, model, folder = exported
    features = _reload(folder, features_only=True)
    indices = default_out_indices(arch)
    dims = [arch.stages[s].dim for _, s, _, _ in arch.iter_blocks()]
    assert features.feature_info.channels() == [dims[i] for i in indices]
    x = _inputs(arch)
    with torch.no_grad():
        maps = features(x)
        expected = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert [m.shape for m in maps] == [e.shape for e in expected]
    assert all(m.dim() == 4 and m.shape[0] == 2 for m in maps)
    assert all(torch.equal(m, e) for m, e in zip(maps, expected))


def test_resolve_data_config(exported) -> None:
    arch, _model, folder = exported
    data_config = resolve_data_config(model=_reload(folder))
    assert data_config["input_size"] == (3, arch.img_size, arch.img_size)
    assert tuple(data_config["mean"]) == DIGITS_MEAN and tuple(data_config["std"]) == DIGITS_STD
    assert data_config["crop_pct"] == 0.875 and data_config["interpolation"] == "bicubic"
    image = Image.new("RGB", (3 * arch.img_size, 2 * arch.img_size), (200, 40, 90))
    assert create_transform(**data_config)(image).shape == (3, arch.img_size, arch.img_size)


def test_default_normalisation_is_imagenet(tmp_path: Path) -> None:
    path = export_model(LocalityViT(PYRAMID), tmp_path / "plain")
    data_config = resolve_data_config(model=_reload(path))
    assert tuple(data_config["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(data_config["std"]) == IMAGENET_DEFAULT_STD
    assert data_config["input_size"] == (3, 16, 16)


def test_one_training_step_with_timm_components(exported) -> None:
    arch, _model, folder = exported
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, drop_path_rate=0.1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=arch.num_classes)
    x, target = mixup(_inputs(arch, 4), torch.tensor([0, 1, 2, 3]))
    loss = SoftTargetCrossEntropy()(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert "head.weight" in changed and len(changed) > len(before) // 2


def test_reload_in_a_fresh_process(tmp_path: Path) -> None:
    """Both families, reloaded by one new interpreter that imports nothing but nasloc and timm."""
    models, jobs = {}, []
    for name, arch in ARCHS.items():
        models[name] = _trained_like(LocalityViT(arch), seed=11)
        folder = export_model(models[name], tmp_path / "export" / name)
        save_file({"x": _inputs(arch)}, str(tmp_path / f"{name}-x.safetensors"))
        jobs += [str(folder), str(tmp_path / f"{name}-x.safetensors"), str(tmp_path / f"{name}-logits.safetensors")]
    code = (
        "import sys, torch, nasloc, timm\n"
        "from safetensors.torch import load_file, save_file\n"
        "args = sys.argv[1:]\n"
        "for folder, inputs, out in zip(args[::3], args[1::3], args[2::3]):\n"
        "    model = timm.create_model('local-dir:' + folder, pretrained=True).eval()\n"
        "    with torch.no_grad():\n"
        "        logits = model(load_file(inputs)['x'])\n"
        "    save_file({'logits': logits.contiguous()}, out)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *jobs], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name, arch in ARCHS.items():
        with torch.no_grad():
            expected = models[name](_inputs(arch))
        logits = load_file(str(tmp_path / f"{name}-logits.safetensors"))["logits"]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- refusals
def test_existing_folder_is_refused_and_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "export" / "best"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="already exists") as err:
        export_model(LocalityViT(PYRAMID), folder)
    assert "\n" not in str(err.value)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"
    assert _leftovers(folder.parent) == []
    with pytest.raises(ExportError, match="not a nasloc export"):  # overwrite never deletes a foreign folder
        export_model(LocalityViT(PYRAMID), folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_an_earlier_export(tmp_path: Path) -> None:
    folder = export_model(LocalityViT(PYRAMID), tmp_path / "best")
    model = _trained_like(LocalityViT(COLUMNAR))
    assert export_model(model, folder, overwrite=True) == folder
    assert json.loads((folder / "config.json").read_text())["model_args"] == COLUMNAR.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    x = _inputs(COLUMNAR)
    with torch.no_grad():
        assert torch.equal(_reload(folder)(x), model(x))


def test_mismatched_weights_fail_and_leave_no_folder(tmp_path: Path) -> None:
    other = LocalityViT(PYRAMID.replace(num_classes=3)).state_dict()
    target = tmp_path / "results" / "export" / "bad"
    with pytest.raises(ExportError) as err:
        export_arch(PYRAMID, other, target)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("weights do not match the arch: 'head.weight' has shape (3, 24) but the arch needs (5, 24)")
    assert not (tmp_path / "results").exists()
    state = LocalityViT(PYRAMID).state_dict()
    del state["stages.1.blocks.0.attn.proj.bias"]
    with pytest.raises(ExportError, match="missing key 'stages.1.blocks.0.attn.proj.bias'"):
        export_arch(PYRAMID, state, target)
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_info_fails_and_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"info\['when'\].*not JSON-serialisable"):
        export_model(LocalityViT(PYRAMID), tmp_path / "out" / "x", info={"when": object()})
    with pytest.raises(ExportError, match="std"):
        export_model(LocalityViT(PYRAMID), tmp_path / "out" / "x", std=(0.2, 0.0, 0.2))
    assert list(tmp_path.iterdir()) == []


def test_export_arch_reads_a_weights_file(tmp_path: Path) -> None:
    model = _trained_like(LocalityViT(COLUMNAR), seed=4)
    save_file(model.state_dict(), str(tmp_path / "best.safetensors"))
    folder = export_arch(COLUMNAR.to_dict(), tmp_path / "best.safetensors", tmp_path / "export")
    x = _inputs(COLUMNAR)
    with torch.no_grad():
        assert torch.equal(_reload(folder)(x), model(x))
    with pytest.raises(ExportError, match="does not exist"):
        export_arch(COLUMNAR, tmp_path / "nope.safetensors", tmp_path / "export2")


# ---------------------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("preset", ["nasloc_lightvit_tiny", "nasloc_deit_tiny"])
def test_an_export_trained_at_32_px_runs_at_224_and_exactly_as_trained_at_32(preset: str, tmp_path: Path) -> None:
    """The arch of the export is at 224 px; the weights, trained at 32 px, load into either size: the
    absolute position embedding (DeiT) and the window tables (LightViT: 4x4 windows at 32 px, 7x7 at 224)
    are resampled at 224 and load untouched at 32."""
    at_32 = PRESETS[preset].replace(img_size=32, num_classes=10)
    trained = _trained_like(LocalityViT(at_32))
    folder = export_model(trained, tmp_path / "export", img_size=224)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"] == at_32.replace(img_size=224).to_dict()
    assert config["nasloc"]["img_size"] == 224 and config["nasloc"]["train_img_size"] == 32
    assert config["nasloc"]["macs"] == count(at_32, img_size=224).macs

    at_224 = _reload(folder)
    assert at_224.arch.img_size == 224 and resolve_data_config(model=at_224)["input_size"] == (3, 224, 224)
    resampled = {k for k, v in at_224.state_dict().items() if v.shape != trained.state_dict()[k].shape}
    assert resampled and all(k == "pos_embed.value" or k.endswith("rel_pos.table.value") for k in resampled)
    assert torch.equal(at_224.state_dict()["head.weight"], trained.state_dict()["head.weight"])
    with torch.no_grad():
        assert torch.isfinite(at_224(torch.randn(1, 3, 224, 224))).all()
        x = _inputs(at_32)
        assert torch.equal(_reload(folder, img_size=32)(x), trained(x))


def test_export_at_a_resolution_the_arch_cannot_take_fails_and_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="img_size 20"):
        export_model(LocalityViT(COLUMNAR), tmp_path / "export", img_size=20)  # not a multiple of patch 8
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- trials
def _make_run(run_dir: Path, storage: str, archs: list[Arch], space: str = "tiny", num_classes: int = 10,
              mean=DIGITS_MEAN, std=DIGITS_STD, **options) -> None:
    """A run folder whose record points at a real study with one trial per arch."""
    if "://" in storage:
        handle = storage
    else:
        handle = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    study = optuna.create_study(study_name="nas", storage=handle, directions=["maximize", "minimize"])
    for i, arch in enumerate(archs):
        cost = count(arch)
        study.add_trial(optuna.trial.create_trial(
            values=[30.0 + i, cost.macs],
            user_attrs=dict(arch=arch.to_dict(), macs=cost.macs, params=cost.params, top1=30.0 + i),
        ))
    options = RunOptions(budget=7e8, space=space, storage=storage, **options)
    RunDir(run_dir).write_record(RunRecord(options, num_classes, mean, std, study_name="nas"))


def _save_retrained(run_dir: Path, trial: int, model: LocalityViT, val_top1: float = 50.0) -> None:
    """What the pipeline leaves in a retrain folder: the weights, the arch as retrained, the checkpoint."""
    run = RunDir(run_dir)
    run.retrain_dir(trial).mkdir(parents=True)
    save_file(model.state_dict(), str(run.retrained_weights(trial)))
    run.write_retrained_arch(trial, model.arch)
    torch.save(dict(epoch=1, model=model.state_dict(), cfg=dict(img_size=model.arch.img_size, epochs=1),
                    history=[dict(epoch=1, train_loss=1.5, val_top1=val_top1)]), run.retrain_checkpoint(trial))


def test_export_trial_from_a_sqlite_study(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _make_run(run, f"sqlite:///{run / 'study.db'}", [PYRAMID, COLUMNAR], dataset="digits")
    retrained = _trained_like(LocalityViT(COLUMNAR), seed=7)
    _save_retrained(run, 1, retrained)

    folder = export_trial(run, 1)
    assert folder == (run / "export" / "trial-1").absolute()
    x = _inputs(COLUMNAR)
    reloaded = _reload(folder, img_size=COLUMNAR.img_size)  # as trained: 32 px, the tiny space deploys at 16
    with torch.no_grad():
        assert torch.equal(reloaded(x), retrained(x))
    block = json.loads((folder / "config.json").read_text())["nasloc"]
    assert block["trial"] == 1 and block["study"] == "nas" and block["proxy_top1"] == 31.0
    assert block["budget"] == 7e8 and block["weights"].startswith("retrained")
    assert block["search_macs"] == count(COLUMNAR).macs and block["macs"] == count(COLUMNAR, img_size=16).macs
    assert tuple(resolve_data_config(model=reloaded)["mean"]) == DIGITS_MEAN

    # trial 0 has an arch but no weights (no retrain folder, no supernet checkpoint)
    with pytest.raises(ExportError, match="no weights exist for trial 0"):
        export_trial(run, 0)
    assert sorted(p.name for p in (run / "export").iterdir()) == ["trial-1"]
    # what `nasloc export --run RUN --trial 1 --out DIR` hands over
    assert export_trial(run, 1, tmp_path / "cli-export") == (tmp_path / "cli-export").absolute()


def test_export_trial_exports_the_arch_at_the_deploy_resolution(tmp_path: Path) -> None:
    """Retrained at 32 px after a search at the tiny space's 16 px: the export is the arch at 16 px (the
    space's deploy resolution) with the weights as retrained (the retrain folder's arch.json says 32, the
    export's train_img_size too), and carries the retrained top-1 (its checkpoint)."""
    run = tmp_path / "run"
    _make_run(run, f"sqlite:///{tmp_path / 'study.db'}", [PYRAMID])
    at_32 = PYRAMID.replace(img_size=32)
    retrained = _trained_like(LocalityViT(at_32), seed=2)
    _save_retrained(run, 0, retrained, val_top1=62.5)
    exported = export_trial(run, 0)
    config = json.loads((exported / "config.json").read_text())
    assert config["model_args"] == PYRAMID.to_dict() and config["nasloc"]["train_img_size"] == 32
    assert resolve_data_config(model=_reload(exported))["input_size"] == (3, 16, 16)
    reloaded = _reload(exported, img_size=32)
    assert resolve_data_config(model=reloaded)["input_size"] == (3, 32, 32)
    x = _inputs(at_32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), retrained(x))
        assert _reload(exported)(_inputs(PYRAMID)).shape == (2, PYRAMID.num_classes)
    assert config["nasloc"]["retrained_top1"] == 62.5


def test_missing_trial_is_an_export_error(tmp_path: Path) -> None:
    assert issubclass(ExportError, ValueError)
    run = tmp_path / "run"
    run.mkdir()
    _make_run(run, f"sqlite:///{run / 'study.db'}", [PYRAMID, COLUMNAR])
    with pytest.raises(ExportError) as err:
        export_trial(run, 7)
    assert str(err.value) == "trial 7 does not exist in study nas (trials: 0-1)"
    assert not (run / "export").exists()
    with pytest.raises(ExportError, match="run.json is missing"):
        export_trial(tmp_path, 0)
    with pytest.raises(StorageError, match="no such SQLite file"):  # never creates an empty study
        open_storage(f"sqlite:///{tmp_path / 'none.db'}", create=False)
    assert not (tmp_path / "none.db").exists()


def test_export_trial_from_the_supernet_with_a_journal_file(tmp_path: Path) -> None:
    space_path = resolve_space_path("tiny")
    space = SearchSpace.load(space_path)
    arch = space.sample(random.Random(5))
    run = tmp_path / "run"
    _make_run(run, str(tmp_path / "journal.log"), [arch], space=str(space_path))
    assert type(open_storage(tmp_path / "journal.log", create=False, heartbeat_interval=None)).__name__ == "JournalStorage"
    supernet = _trained_like(Supernet(space), seed=3)
    RunDir(run).supernet_dir.mkdir()
    torch.save({"epoch": 2, "model": supernet.state_dict(), "img_size": supernet.img_size}, RunDir(run).supernet_checkpoint)

    folder = export_trial(run, 0, tmp_path / "best")
    x = _inputs(arch)
    with torch.no_grad():
        assert torch.equal(_reload(folder)(x), supernet(x, arch))
    assert json.loads((folder / "config.json").read_text())["nasloc"]["weights"].startswith("supernet")
