"""ONNX: a model (or one part of it, for the latency table) exported with torch's ONNX exporter and run with
ONNX Runtime on the CPU.

onnx, onnxscript (torch's exporter needs it) and onnxruntime are the optional extra ``nasloc[onnx]``; without
them every entry point fails with one line saying how to install them.
"""
from __future__ import annotations

import io
import tempfile
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import NaslocError, first_line

INSTALL_HINT = "pip install 'nasloc[onnx]'"
MAX_ABS_DIFF = 1e-4  # the most an exported model's logits may differ from torch's
OPSET = 18


class OnnxError(NaslocError):
    """ONNX export or ONNX Runtime unavailable or failing; the message is one line."""


def onnxruntime() -> Any:
    """The onnxruntime module, or OnnxError saying how to install it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxError(f"onnxruntime is not installed: {INSTALL_HINT}") from None
    return ort


def to_onnx(module: nn.Module, x: torch.Tensor, path: str | Path) -> Path:
    """Export ``module`` (eval mode) for inputs shaped like ``x`` to one ONNX file at ``path``."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs onnx and onnxscript
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise OnnxError(f"{e.name} is not installed: {INSTALL_HINT}") from None
    module = module.eval()
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # the exporter reports its steps on stdout
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (x,), str(path), dynamo=True, verbose=False, opset_version=OPSET,
                              external_data=False, input_names=["input"], output_names=["output"])
        except Exception as e:  # noqa: BLE001 - an op the exporter cannot translate
            raise OnnxError(f"torch's ONNX exporter failed: {first_line(e)}") from None
    return Path(path)


def ort_session(path: str | Path) -> Any:
    """An ONNX Runtime CPU session with torch's thread count (intra-op), one inter-op thread."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_call(session: Any, x: torch.Tensor) -> Callable[[], Any]:
    """``session`` run on ``x``, as a function of no arguments."""
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return lambda: session.run(None, feed)[0]


def ort_runner(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """``module(x)`` exported and run by ONNX Runtime, as a function of no arguments."""
    with tempfile.TemporaryDirectory(prefix="nasloc-onnx-") as folder:
        session = ort_session(to_onnx(module, x, Path(folder) / "part.onnx"))  # the session holds the graph
    return ort_call(session, x)


def max_abs_diff(module: nn.Module, session: Any, x: torch.Tensor) -> float:
    """Largest absolute difference between ``module(x)`` in torch and ``session`` on ``x``."""
    with torch.inference_mode():
        expected = module.eval()(x)
    return float((torch.from_numpy(ort_call(session, x)()) - expected).abs().max())


def export_checked(model: nn.Module, path: Path, img_size: int, in_chans: int = 3) -> dict[str, Any]:
    """Export ``model`` for one image of ``img_size`` px to ``path``, check it against torch on a random image and
    time it with ONNX Runtime; returns what the export's config records. OnnxError (one line) when ONNX Runtime's
    logits differ from torch's by more than :data:`MAX_ABS_DIFF`."""
    from .timing import fastest_time_us

    onnxruntime()  # before the export: a missing extra fails at once
    x = torch.randn(1, in_chans, img_size, img_size)
    session = ort_session(to_onnx(model, x, path))
    diff = max_abs_diff(model, session, x)
    if not diff <= MAX_ABS_DIFF:
        raise OnnxError(f"the ONNX model's logits differ from torch's by {diff:.3g} (more than {MAX_ABS_DIFF:g})")
    return {"file": path.name, "opset": OPSET, "max_abs_diff": diff, "onnxruntime": onnxruntime().__version__,
            "onnxruntime_latency_ms": fastest_time_us(ort_call(session, x)) / 1000, "latency_batch_size": 1,
            "latency_threads": torch.get_num_threads()}
