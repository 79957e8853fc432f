"""Elastic (sliceable) layers: the only place where weights are sliced.

Every layer of the model family is one of these. A layer is built at its largest size and its
forward takes the *active* size: input sizes are read off the input tensor, output sizes are
passed in. A standalone model is simply built at the arch's own sizes, so its forward runs the
same code on whole tensors; the supernet is built at the space's largest sizes and runs any arch
as a slice (weight entanglement as in AutoFormer). Kernels are sliced as the centre of the
largest kernel (Once-for-All).

Sizes may be *grouped*: a qkv-like output of ``g`` blocks of ``n`` rows, or a concatenation of
``g`` inputs of ``n`` channels, is sliced block by block, so that channel ``i`` of every group
keeps its meaning whatever the active width.

``load_slice_`` copies the matching slice of a (larger) layer of the same type into this one: it
is how a subnet is extracted from the supernet with exactly the weights its forward used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import native


def grouped_slice(t: Tensor, sizes: tuple[tuple[int, int], ...]) -> Tensor:
    """Slice the leading ``len(sizes)`` dims of ``t``; dim ``i`` holds ``groups`` blocks of which
    the first ``n`` entries of each are kept. ``sizes`` is ((groups, n), ...)."""
    full = tuple(t.shape[: len(sizes)])
    if all(g * n == d for (g, n), d in zip(sizes, full)):
        return t
    shape = []
    for (groups, _), d in zip(sizes, full):
        shape += [groups, d // groups]
    view = t.reshape(*shape, *t.shape[len(sizes):])
    index = []
    for groups, n in sizes:
        index += [slice(None), slice(0, n)]
    out = view[tuple(index)]
    return out.reshape(*(g * n for g, n in sizes), *t.shape[len(sizes):])


def centre_crop_kernel(weight: Tensor, kernel: int) -> Tensor:
    size = weight.shape[-1]
    if kernel == size:
        return weight
    start = (size - kernel) // 2
    return weight[..., start : start + kernel, start : start + kernel]


class ElasticLinear(nn.Linear):
    """Linear layer whose active in/out features may be smaller than its weight.

    ``in_groups``/``out_groups`` > 1 mark concatenated inputs/outputs (e.g. q, k, v) that are
    sliced group-wise.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, in_groups: int = 1, out_groups: int = 1):
        super().__init__(in_features * in_groups, out_features * out_groups, bias=bias)
        self.in_groups = in_groups
        self.out_groups = out_groups

    def forward(self, x: Tensor, out_features: int | None = None, use_bias: bool = True) -> Tensor:
        """``out_features`` is per output group; ``use_bias=False`` skips a bias that only some
        subnets use (the supernet's k and v biases in a LIFE block)."""
        in_f = x.shape[-1] // self.in_groups
        out_f = out_features or self.out_features // self.out_groups
        weight = grouped_slice(self.weight, ((self.out_groups, out_f), (self.in_groups, in_f)))
        bias = None if self.bias is None or not use_bias else grouped_slice(self.bias, ((self.out_groups, out_f),))
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def load_slice_(self, src: "ElasticLinear") -> None:
        out_f, in_f = self.out_features // self.out_groups, self.in_features // self.in_groups
        self.weight.copy_(grouped_slice(src.weight, ((self.out_groups, out_f), (self.in_groups, in_f))))
        if self.bias is not None:
            self.bias.copy_(grouped_slice(src.bias, ((self.out_groups, out_f),)))


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the active channels (``groups`` concatenated blocks of them)."""

    def __init__(self, dim: int, eps: float = 1e-6, groups: int = 1):
        super().__init__(dim * groups, eps=eps)
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[-1] // self.groups
        sizes = ((self.groups, n),)
        return F.layer_norm(x, (x.shape[-1],), grouped_slice(self.weight, sizes), grouped_slice(self.bias, sizes), self.eps)

    @torch.no_grad()
    def load_slice_(self, src: "ElasticLayerNorm") -> None:
        sizes = ((self.groups, self.normalized_shape[0] // self.groups),)
        self.weight.copy_(grouped_slice(src.weight, sizes))
        self.bias.copy_(grouped_slice(src.bias, sizes))


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of its statistics (C read off the input).

    Slices of the running statistics are views, so training updates them in place.
    """

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            # momentum None = cumulative average, as in nn.BatchNorm2d (used to recalibrate statistics)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training,
            factor,
            self.eps,
        )

    @torch.no_grad()
    def load_slice_(self, src: "ElasticBatchNorm2d") -> None:
        c = self.num_features
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(self, name).copy_(getattr(src, name)[:c])
        self.num_batches_tracked.copy_(src.num_batches_tracked)


class ElasticConv2d(nn.Conv2d):
    """Dense or depth-wise conv with active in/out channels and kernel (centre crop).

    Depth-wise (``groups == in_channels``) convs keep one filter per active channel. With
    ``same_padding`` the map keeps its size at stride 1; without it (patch embedding) nothing is padded.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = True,
        depthwise: bool = False,
        same_padding: bool = True,
    ):
        groups = in_channels if depthwise else 1
        padding = kernel_size // 2 if same_padding else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=padding, groups=groups, bias=bias)
        self.depthwise = depthwise
        self.same_padding = same_padding

    def forward(self, x: Tensor, out_channels: int | None = None, kernel: int | None = None, dilation: int = 1) -> Tensor:
        c_in = x.shape[1]
        kernel = kernel or self.kernel_size[0]
        if self.depthwise:
            c_out, weight = c_in, self.weight[:c_in]
        else:
            c_out = out_channels or self.out_channels
            weight = self.weight[:c_out, :c_in]
        weight = centre_crop_kernel(weight, kernel)
        bias = None if self.bias is None else self.bias[:c_out]
        padding = dilation * (kernel // 2) if self.same_padding else 0
        return _channels_last_conv(x, weight, bias, self.stride, padding, dilation, c_in if self.depthwise else 1)

    @torch.no_grad()
    def load_slice_(self, src: "ElasticConv2d") -> None:
        weight = src.weight[: self.out_channels, : self.weight.shape[1]]
        self.weight.copy_(centre_crop_kernel(weight, self.kernel_size[0]))
        if self.bias is not None:
            self.bias.copy_(src.bias[: self.out_channels])


def _channels_last_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding: int, dilation: int, groups: int
) -> Tensor:
    """A conv on channels-last memory, forward and backward.

    oneDNN runs convs (depth-wise ones 3-10x) faster on channels-last-contiguous tensors than on NCHW or
    on the maps viewed from (B, N, C) tokens, which have channels-last strides but the auxiliary tokens in
    their batch stride (it reorders those on a slow path). So the input and the gradient that comes back
    are made channels-last-contiguous, and the output is channels-last: the conv stems, their batch norms
    and activations then run channels-last end to end (mixed layouts would slow the norms' backward), and
    a map turns into tokens as a view.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    if _DepthwiseConv.takes(x, weight, stride, padding, dilation, groups):
        y = _DepthwiseConv.apply(x, weight, bias, padding, dilation)
    else:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if y.requires_grad:
        y.register_hook(lambda grad: None if grad is None else grad.contiguous(memory_format=torch.channels_last))
    return y


class _DepthwiseConv(torch.autograd.Function):
    """A depth-wise conv (stride 1, same padding) whose weight gradient comes from a fused CPU kernel.

    For kernels above 3x3, oneDNN computes that gradient with its generic grouped kernel, 10-15x slower
    than the forward (``csrc/depthwise_conv.cpp``); the forward and the input gradient stay oneDNN's.
    """

    @staticmethod
    def takes(x: Tensor, weight: Tensor, stride, padding: int, dilation: int, groups: int) -> bool:
        kernel = weight.shape[-1]
        depthwise = groups == x.shape[1] == weight.shape[0]
        same_size = stride in (1, (1, 1)) and padding == dilation * (kernel // 2)
        return (kernel > 3 and depthwise and same_size and torch.is_grad_enabled() and weight.requires_grad
                and native.usable(x, weight) and native.load("depthwise_conv") is not None)

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, dilation: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        pad, dil = [ctx.padding] * 2, [ctx.dilation] * 2
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], pad, dil, False, [0, 0], x.shape[1], [True, False, False])[0]
        grad_w = native.load("depthwise_conv").weight_grad(grad, x, weight.shape[-1], ctx.padding, ctx.dilation)
        grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class ElasticParameter(nn.Module):
    """A learned tensor (class token, position embedding, global tokens, bias tables) whose
    leading dims may be sliced: ``forward(*sizes)`` returns ``value[:s0, :s1, ...]``."""

    def __init__(self, *shape: int, std: float = 0.02):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(*shape))
        nn.init.trunc_normal_(self.value, std=std)

    def forward(self, *sizes: int) -> Tensor:
        return self.value[tuple(slice(0, s) for s in sizes)]

    @torch.no_grad()
    def load_slice_(self, src: "ElasticParameter") -> None:
        self.value.copy_(src(*self.value.shape))


ELASTIC_LAYERS = (ElasticLinear, ElasticLayerNorm, ElasticBatchNorm2d, ElasticConv2d, ElasticParameter)


@torch.no_grad()
def load_slices_(target: nn.Module, source: nn.Module) -> None:
    """Copy into every elastic layer of ``target`` the slice of the same-named layer of ``source``.

    ``target`` is a standalone model whose layer names are a subset of ``source``'s (the supernet).
    """
    source_modules = dict(source.named_modules())
    for name, module in target.named_modules():
        if isinstance(module, ELASTIC_LAYERS):
            if name not in source_modules:
                raise KeyError(f"layer {name!r} of the subnet has no counterpart in the supernet")
            module.load_slice_(source_modules[name])
        elif not isinstance(module, ELASTIC_LAYERS) and list(module.parameters(recurse=False)):
            raise TypeError(f"layer {name!r} ({type(module).__name__}) is not elastic and cannot be sliced")
