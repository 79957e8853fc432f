"""MACs of a built model as fvcore counts them (attention included): the reference the analytic counter
(:mod:`nasloc.space.flops`) is checked against, and what ``nasloc evaluate`` reports for any timm model."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: q.k and attn.v matmuls."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _vecdot_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::linalg_vecdot (dilated attention's logits): one MAC per product summed."""
    from fvcore.nn.jit_handles import get_shape

    return math.prod(torch.broadcast_shapes(tuple(get_shape(inputs[0])), tuple(get_shape(inputs[1]))))


def _addcmul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::addcmul_ (dilated attention's weighted values): one MAC per element."""
    from fvcore.nn.jit_handles import get_shape

    return math.prod(get_shape(outputs[0]))


def fvcore_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """MACs of one image through ``model`` (eval mode) as fvcore counts them, attention included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore.nn imports torch.jit.script, deprecated in torch 2.14
        from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size, device=next(model.parameters()).device)
    analysis = FlopCountAnalysis(model, x).set_op_handle(
        "aten::scaled_dot_product_attention", _sdpa_macs,
        "aten::linalg_vecdot", _vecdot_macs,
        "aten::addcmul_", _addcmul_macs,
    )
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = analysis.total()
    model.train(was_training)
    return int(total)
