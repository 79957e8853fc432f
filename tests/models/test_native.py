"""The fused CPU kernels (``nasloc/models/csrc``): neighbourhood attention (dilated) and the weight gradient
of depth-wise convs. Built here, equal to the eager forms, used where they should be and nowhere else, and a failed
build falls back with a warning (issue 19).

``test_models.py`` checks both implementations against a reference written from the paper's formula.
"""
from __future__ import annotations

import pytest
import torch

from nasloc.models import native
from nasloc.models.dilated import dilated_attention, fused_dilated_attention, shift_multiply_attention
from nasloc.models.elastic import ElasticLinear, _channels_last_conv
from nasloc.models.layout import Geometry, split_heads
from nasloc.models.lightvit import broadcast
from nasloc.models.neighbourhood import dilated_tables, neighbourhood_attention


@pytest.mark.parametrize("stem", ["neighbourhood_attention", "depthwise_conv"])
def test_the_kernels_build_on_this_machine(stem):
    # the machine has a C++ compiler (gcc) and the ninja package: a failure here is a real build failure
    assert native.load(stem) is not None


def _model_layout(batch: int, heads: int, geo: Geometry, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """q, k, v as the model makes them: views of (B, aux + H*W, heads * d) after the auxiliary tokens."""
    n = geo.n_aux + geo.height * geo.width
    leaves = [torch.randn(batch, n, heads * d, dtype=dtype, requires_grad=True) for _ in range(3)]
    return leaves, [split_heads(t[:, geo.n_aux :], heads) for t in leaves]


@pytest.mark.parametrize(
    "dilations,height,width,n_aux,kernel",
    [((1, 2, 3), 8, 8, 0, 3), ((3, 1, 2, 1), 7, 5, 9, 3), ((2, 2), 6, 6, 1, 5), ((4, 1), 3, 3, 0, 3)],
)
@pytest.mark.parametrize("d", [16, 36, 20])  # head widths the kernel is compiled for (16, 36) and one it is not
def test_fused_equals_shift_multiply_in_float32(dilations, height, width, n_aux, kernel, d):
    # issue 19: outputs within 1e-5 of the eager implementation; strided views, rates out of order, borders
    torch.manual_seed(0)
    geo = Geometry(height, width, 1 if n_aux else 0, max(0, n_aux - 1))
    leaves, qkv = _model_layout(3, len(dilations), geo, d, torch.float32)
    grad_out = torch.randn(3, len(dilations), height * width, d)
    results = []
    for attention in (fused_dilated_attention, shift_multiply_attention):
        out = attention(*qkv, geo, dilations, kernel)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
        with torch.no_grad():
            torch.testing.assert_close(attention(*qkv, geo, dilations, kernel), out, atol=0, rtol=0)
    for fused, eager in zip(*results):
        assert (fused - eager).abs().max().item() <= 1e-5


def test_fused_broadcast_equals_sdpa(monkeypatch):
    # LightViT's broadcast: image queries over the few global tokens (and there are fewer keys than queries)
    torch.manual_seed(0)
    q = torch.randn(3, 20, 4, 8).transpose(1, 2).requires_grad_()
    aggregated = torch.randn(3, 4, 5, 8, requires_grad=True)
    global_kv = ElasticLinear(32, 32, out_groups=2)
    grad_out = torch.randn(3, 4, 20, 8)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("NASLOC_NATIVE", switch)
        out = broadcast(q, aggregated, global_kv, 4)
        assert ("Neighbourhood" in out.grad_fn.name()) == (switch == "1")
        results.append((out, *torch.autograd.grad(out, (q, aggregated, global_kv.weight), grad_out)))
    for fused, eager in zip(*results):
        assert (fused - eager).abs().max().item() <= 1e-5


def test_fused_gradients_pass_gradcheck():
    torch.manual_seed(0)
    geo = Geometry(4, 5, 0, 0)
    q, k, v = (torch.randn(2, 3, 20, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: fused_dilated_attention(q, k, v, geo, (1, 2, 3), 3), (q, k, v))


def test_dilated_attention_takes_the_kernel_on_the_cpu_and_the_eager_form_when_disabled(monkeypatch):
    geo = Geometry(4, 4, 0, 0)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    assert "Neighbourhood" in dilated_attention(q, k, v, geo, (1, 2), 3).grad_fn.name()
    monkeypatch.setenv("NASLOC_NATIVE", "0")
    assert "Neighbourhood" not in dilated_attention(q, k, v, geo, (1, 2), 3).grad_fn.name()


def test_tables_made_in_inference_mode_serve_training_later():
    # an evaluation (inference_mode) may build a geometry's tables first; training then saves them
    dilated_tables.cache_clear()
    geo = Geometry(5, 5, 0, 0)
    q, k, v = (torch.randn(1, 2, 25, 4, requires_grad=True) for _ in range(3))
    with torch.inference_mode():
        dilated_attention(q.detach(), k.detach(), v.detach(), geo, (1, 3), 3)
    dilated_attention(q, k, v, geo, (1, 3), 3).sum().backward()
    assert q.grad is not None


def test_a_trace_sees_the_eager_ops():
    # fvcore counts a jit trace: it must see shift and multiply (vecdot, addcmul_), not one opaque call;
    # test_models checks that those counts equal the analytic MACs
    geo = Geometry(4, 4, 0, 0)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    graph = str(torch.jit.trace(lambda q, k, v: dilated_attention(q, k, v, geo, (1, 2), 3), (q, k, v)).graph)
    assert "aten::linalg_vecdot" in graph and "aten::addcmul_" in graph


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch):
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "_SOURCES", tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "builds"))
    with pytest.warns(UserWarning, match="could not be built"):
        assert native.load.__wrapped__("broken") is None


# ------------------------------------------------------------------ depth-wise conv weight gradient
@pytest.mark.parametrize("kernel,dilation,bias", [(5, 1, True), (7, 1, False), (5, 2, True), (3, 1, True)])
def test_depthwise_conv_gradients_equal_onednn(kernel, dilation, bias, monkeypatch):
    # kernels above 3x3 take the fused weight gradient; 3x3 stays oneDNN's (faster there)
    torch.manual_seed(0)
    x = torch.randn(4, 24, 7, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(24, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [t for t in (x, weight, b) if t is not None]
    grad = torch.randn(4, 24, 7, 9, dtype=torch.float64)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("NASLOC_NATIVE", switch)
        y = _channels_last_conv(x, weight, b, 1, dilation * (kernel // 2), dilation, 24)
        assert ("Depthwise" in y.grad_fn.name()) == (switch == "1" and kernel > 3)
        results.append((y, *torch.autograd.grad(y, leaves, grad)))
    for fused, onednn in zip(*results):
        torch.testing.assert_close(fused, onednn)


def test_depthwise_conv_weight_gradient_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _channels_last_conv(x, w, None, 1, 2, 1, 5), (x, weight))


def test_a_key_index_beyond_the_keys_is_refused():
    q, k, v = (torch.randn(1, 1, n, 4) for n in (3, 2, 2))
    keys = torch.tensor([[[0, 1], [1, 2], [0, -1]]])
    with pytest.raises(RuntimeError, match="beyond the keys"):
        neighbourhood_attention(q, k, v, keys, torch.zeros(1, dtype=torch.long))
