"""ONNX export: every locality mechanism exports with torch's exporter and runs in ONNX Runtime as in torch; the
check, the latency record, the command and the missing-extra message."""
from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import pytest
import torch

import nasloc.deploy.onnx
from nasloc.arch import Arch, Block, Shortcut, Stage
from nasloc.cli.main import main
from nasloc.deploy.export import ONNX_NAME, ExportError, export_model
from nasloc.models import LocalityViT

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _arch(**fields) -> Arch:
    return Arch(**{"img_size": 16, "patch_size": 4, "num_classes": 10, "window": 2, **fields})


MECHANISMS = {
    "dw shortcut, patch stem": _arch(stages=(Stage(12, 2, 2.0, (Block(), Block())),), shortcuts=(Shortcut(0, 2, (3, 5)),)),
    "lightvit global tokens, conv stem": _arch(stem="conv", global_tokens=2, ffn="bidim",
                                               stages=(Stage(12, 2, 2.0, (Block("window"), Block("window"))),)),
    "life, localvit FFN conv": _arch(ffn="localvit", stages=(Stage(12, 2, 2.0, (Block(life=True, ffn_kernel=3),)),)),
    "dilated attention, cpe": _arch(cpe=True, cls_token=False, head="avg", patch_size=2,
                                    stages=(Stage(12, 2, 2.0, (Block("dilated", (1, 2), ffn_kernel=3),)),)),
    "lightvit stem, merge, neck": _arch(img_size=32, stem="lightvit", downsample="merge", pos_embed="none",
                                        cls_token=False, head="neck", neck_dim=32, global_tokens=2,
                                        stages=(Stage(12, 2, 2.0, (Block("window"),)),
                                                Stage(24, 2, 2.0, (Block("dilated", (1, 1)),)))),
}


def _trained_like(model: LocalityViT) -> LocalityViT:
    """Weights and BatchNorm statistics away from their initial values, so that logits are not all near 0."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor + 0.1 * torch.randn_like(tensor).abs())
    return model.eval()


@pytest.mark.parametrize("name", MECHANISMS)
def test_the_onnx_export_matches_torch(name: str, tmp_path: Path) -> None:
    arch = MECHANISMS[name]
    model = _trained_like(LocalityViT(arch))
    folder = export_model(model, tmp_path / "export", onnx=True)
    record = json.loads((folder / "config.json").read_text())["nasloc"]["onnx"]
    assert record["file"] == ONNX_NAME and record["max_abs_diff"] <= 1e-4
    assert record["onnxruntime_latency_ms"] > 0 and record["latency_batch_size"] == 1
    session = nasloc.deploy.onnx.ort_session(folder / ONNX_NAME)
    x = torch.randn(1, 3, arch.img_size, arch.img_size)
    with torch.inference_mode():
        expected = model(x)
    assert expected.abs().max() > 1e-2  # a comparison of real numbers, not of zeros
    assert torch.allclose(torch.from_numpy(nasloc.deploy.onnx.ort_call(session, x)()), expected, atol=1e-4)


def test_the_onnx_file_takes_the_export_resolution(tmp_path: Path) -> None:
    """Trained at 16 px, exported at 32: the ONNX model is the model timm rebuilds at 32 px."""
    model = _trained_like(LocalityViT(MECHANISMS["dw shortcut, patch stem"]))
    folder = export_model(model, tmp_path / "export", img_size=32, onnx=True)
    session = nasloc.deploy.onnx.ort_session(folder / ONNX_NAME)
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]


def test_an_export_that_differs_from_torch_fails_in_one_line_and_writes_nothing(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nasloc.deploy.onnx, "MAX_ABS_DIFF", -1.0)
    with pytest.raises(ExportError, match="differ from torch's") as err:
        export_model(LocalityViT(MECHANISMS["dw shortcut, patch stem"]), tmp_path / "export", onnx=True)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_without_onnxruntime_the_error_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ExportError, match=r"pip install 'nasloc\[onnx\]'") as err:
        export_model(LocalityViT(MECHANISMS["dw shortcut, patch stem"]), tmp_path / "export", onnx=True)
    assert "\n" not in str(err.value) and not (tmp_path / "export").exists()


def test_nasloc_export_onnx_prints_the_difference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    exported: list = []

    def export_trial(run, trial, out, onnx=False, budget=""):
        exported.append(onnx)
        return export_model(LocalityViT(MECHANISMS["dw shortcut, patch stem"]), out, onnx=onnx)

    monkeypatch.setattr("nasloc.deploy.export.export_trial", export_trial)
    assert main(["export", "--run", str(tmp_path), "--trial", "0", "--out", str(tmp_path / "out"), "--onnx"]) == 0
    assert exported == [True]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "max abs difference to torch" in line and "ONNX Runtime latency" in line


def test_the_onnxruntime_backend_times_a_part() -> None:
    from nasloc.deploy.latency import Target
    from nasloc.deploy.latency_parts import probe, space_parts
    from nasloc.space.search_space import SearchSpace

    key = min(space_parts(SearchSpace.load("tiny")), key=len)
    module, x = probe(key, batch_size=1)
    assert Target("cpu", "onnxruntime").time_us(module, x) > 0
    assert "onnxruntime" in Target("cpu", "onnxruntime").versions()
