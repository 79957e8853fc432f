"""Every locality block against a plain reference written straight from the papers' formulas (issue 19).

The model's blocks take fast paths (fused attention, shift-and-multiply dilated attention, views instead of
copies); the references below are the slow, obvious forms: explicit neighbourhood and window index lists,
softmax(q k^T / sqrt(d)) v written out, convs through ``F.conv2d`` on a map built by a plain permute. They
read the weights of a standalone block (whole tensors, no slicing) and must give its outputs within 1e-5,
in eval and in training mode, and the same input and weight gradients. Inside the supernet, every block and
shortcut of a subnet (a slice of the supernet's weights) must give the reference output computed with the
weights of the extracted standalone model: the elastic slicing and the fast paths are checked together.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nasloc.arch import Arch, Block, Shortcut
from nasloc.models import LocalityViT
from nasloc.models.dw_shortcut import DWShortcut
from nasloc.models.layout import Geometry, Tokens
from nasloc.models.locality_vit import LocalityBlock
from nasloc.models.presets import columnar, dilateformer, lightvit
from nasloc.space.search_space import SearchSpace
from nasloc.supernet.supernet import Supernet

TOL = 1e-5


# ----------------------------------------------------------------------------- reference ops
def tokens_to_map(img: Tensor, geo: Geometry) -> Tensor:
    b, _, c = img.shape
    return img.permute(0, 2, 1).reshape(b, c, geo.height, geo.width)


def on_image(x: Tensor, geo: Geometry, fn) -> Tensor:
    """fn applied to the image tokens as a (B, C, H, W) map; auxiliary tokens unchanged."""
    aux, img = x[:, : geo.n_aux], x[:, geo.n_aux :]
    out = fn(tokens_to_map(img, geo))
    return torch.cat([aux, out.flatten(2).permute(0, 2, 1)], dim=1)


def dwconv(m: Tensor, conv, kernel: int, dilation: int = 1) -> Tensor:
    """Depth-wise conv with the centre ``kernel`` x ``kernel`` of the conv's weight."""
    w = conv.weight
    start = (w.shape[-1] - kernel) // 2
    w = w[..., start : start + kernel, start : start + kernel]
    return F.conv2d(m, w, conv.bias, padding=dilation * (kernel // 2), dilation=dilation, groups=m.shape[1])


def linear(x: Tensor, layer, bias: bool = True) -> Tensor:
    return x @ layer.weight.T + (layer.bias if bias and layer.bias is not None else 0)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | float = 0.0, allowed: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, keys outside ``allowed`` left out."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1) @ v


def heads_of(t: Tensor, heads: int) -> Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def dilated_reference(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, rates: tuple[int, ...], kernel: int) -> Tensor:
    """Each query attends to the in-map keys of its kxk neighbourhood sampled at its head's rate."""
    h_, w_ = geo.height, geo.width
    out = torch.empty_like(q)
    for head, rate in enumerate(rates):
        allowed = torch.zeros(h_ * w_, h_ * w_, dtype=torch.bool)
        for y in range(h_):
            for x in range(w_):
                for i in range(kernel):
                    for j in range(kernel):
                        ky, kx = y + (i - kernel // 2) * rate, x + (j - kernel // 2) * rate
                        if 0 <= ky < h_ and 0 <= kx < w_:
                            allowed[y * w_ + x, ky * w_ + kx] = True
        out[:, head] = attend(q[:, head], k[:, head], v[:, head], allowed=allowed)
    return out


def window_reference(q: Tensor, k: Tensor, v: Tensor, geo: Geometry, window: int, table: Tensor) -> Tensor:
    """Attention inside each window, plus the relative position bias table[(dy + w - 1) * (2w - 1) + dx + w - 1]."""
    out = torch.empty_like(q)
    for top in range(0, geo.height, window):
        for left in range(0, geo.width, window):
            cells = [(y, x) for y in range(top, top + window) for x in range(left, left + window)]
            index = torch.tensor([y * geo.width + x for y, x in cells])
            rel = torch.tensor([[(ya - yb + window - 1) * (2 * window - 1) + xa - xb + window - 1
                                 for yb, xb in cells] for ya, xa in cells])
            bias = table[rel].permute(2, 0, 1)  # heads, n, n
            out[:, :, index] = attend(q[:, :, index], k[:, :, index], v[:, :, index], bias)
    return out


def life_reference(mixer, x: Tensor, geo: Geometry) -> tuple[Tensor, Tensor, Tensor]:
    """LIFE: s1 = W1 x + b1, s2 = W2 DW3(s1), s3 = W3 DW5(s2); Q, K, V each take their third of every scale."""
    s1 = linear(x, mixer.q)
    s2 = linear(on_image(s1, geo, lambda m: dwconv(m, mixer.life.dw3, 3)), mixer.k, bias=False)
    s3 = linear(on_image(s2, geo, lambda m: dwconv(m, mixer.life.dw5, 5)), mixer.v, bias=False)
    third = x.shape[-1] // 3
    return tuple(torch.cat([s[..., i * third : (i + 1) * third] for s in (s1, s2, s3)], -1) for i in range(3))


def mixer_reference(mixer, x: Tensor, geo: Geometry, heads: int, block: Block, window: int, kernel: int) -> Tensor:
    if block.life:
        q, k, v = life_reference(mixer, x, geo)
    else:
        q, k, v = (linear(x, lin) for lin in (mixer.q, mixer.k, mixer.v))
    q, k, v = (heads_of(t, heads) for t in (q, k, v))
    n = geo.n_aux
    if block.mixer == "global":
        out = attend(q, k, v)
    else:
        if block.mixer == "dilated":
            img = dilated_reference(q[:, :, n:], k[:, :, n:], v[:, :, n:], geo, block.dilations, kernel)
        else:
            img = window_reference(q[:, :, n:], k[:, :, n:], v[:, :, n:], geo, window, mixer.rel_pos.table.value)
        aux = attend(q[:, :, :n], k[:, :, n:], v[:, :, n:])  # aggregation
        if block.mixer == "window" and geo.n_global:
            glb = aux[:, :, geo.n_cls :].permute(0, 2, 1, 3).flatten(2)
            kv = linear(glb, mixer.global_kv)
            k_g, v_g = (heads_of(t, heads) for t in kv.chunk(2, dim=-1))
            img = img + attend(q[:, :, n:], k_g, v_g)  # broadcast
        out = torch.cat([aux, img], dim=2)
    return linear(out.permute(0, 2, 1, 3).flatten(2), mixer.proj)


def batch_norm(m: Tensor, norm) -> Tensor:
    if norm.training:
        return F.batch_norm(m, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
    return F.batch_norm(m, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def layer_norm(x: Tensor, norm) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def bidim_reference(gate, y: Tensor) -> Tensor:
    """LightViT's BiDim gate: y * sigmoid(channel gate of the mean token) * sigmoid(spatial gate per token)."""
    z = layer_norm(y, gate.norm)
    glb = F.gelu(linear(z.mean(1, keepdim=True), gate.global_reduce))
    loc = F.gelu(linear(z, gate.local_reduce))
    channel = torch.sigmoid(linear(glb, gate.channel_select))
    spatial = torch.sigmoid(linear(torch.cat([loc, glb.expand_as(loc)], -1), gate.spatial_select))
    return y * channel * spatial


def mlp_reference(mlp, x: Tensor, geo: Geometry, kernel: int, gate: bool) -> Tensor:
    h = F.gelu(linear(x, mlp.fc1))
    if kernel:
        h = on_image(h, geo, lambda m: F.gelu(dwconv(m, mlp.conv, kernel)))
    y = linear(h, mlp.fc2)
    return bidim_reference(mlp.gate, y) if gate else y


def localvit_reference(ffn, x: Tensor, geo: Geometry, kernel: int) -> Tensor:
    """LocalViT's FFN on the image tokens, with its residual; auxiliary tokens pass unchanged."""
    def body(m: Tensor) -> Tensor:
        h = F.hardswish(batch_norm(F.conv2d(m, ffn.fc1.weight[:, :, None, None]), ffn.norm1))
        if kernel:
            h = F.hardswish(batch_norm(dwconv(h, ffn.conv, kernel), ffn.norm2))
        squeezed = F.relu(linear(h.mean((2, 3)), ffn.se.reduce))
        h = h * F.hardsigmoid(linear(squeezed, ffn.se.expand))[:, :, None, None]
        return m + batch_norm(F.conv2d(h, ffn.fc2.weight[:, :, None, None]), ffn.norm3)

    return on_image(x, geo, body)


def block_reference(blk: LocalityBlock, x: Tensor, geo: Geometry, arch: Arch, stage, block: Block, window: int) -> Tensor:
    if arch.cpe:
        x = on_image(x, geo, lambda m: m + dwconv(m, blk.cpe.conv, 3))
    x = x + mixer_reference(blk.attn, layer_norm(x, blk.norm1), geo, stage.heads, block, window, arch.dilate_kernel)
    if arch.ffn == "localvit":
        return localvit_reference(blk.ffn, x, geo, block.ffn_kernel)
    return x + mlp_reference(blk.ffn, layer_norm(x, blk.norm2), geo, block.ffn_kernel, arch.ffn == "bidim")


def shortcut_reference(sc: DWShortcut, img: Tensor, geo: Geometry, kernels: tuple[int, ...]) -> Tensor:
    """The term added to the image tokens (the shortcut's input and output are image tokens alone)."""
    act = F.gelu(tokens_to_map(img, geo))
    out = sum(dwconv(batch_norm(act, sc.branches[f"k{k}"].norm), sc.branches[f"k{k}"].conv, k) for k in kernels)
    return out.flatten(2).permute(0, 2, 1)


# ----------------------------------------------------------------------------- recording the model
def record_calls(model: torch.nn.Module) -> tuple[list, list]:
    """Hooks that record (module name, inputs, output) of every block and shortcut call."""
    calls = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, output):
        calls.append((names[module], args, output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (LocalityBlock, DWShortcut))]
    return calls, handles


def joined(value):
    """A recorded block input or output as one (B, n_aux + H*W, C) tensor (shortcuts: image tokens)."""
    return value.whole() if isinstance(value, Tokens) else value


def run_module(module, x: Tensor, args) -> Tensor:
    """``module`` called as the model calls it (``args`` recorded), on ``x`` given and returned as :func:`joined`."""
    if isinstance(module, DWShortcut):
        return module(x, *args[1:])
    return module(Tokens.of_joined(x, args[1].n_aux), *args[1:]).whole()


def reference_of(module, args) -> Tensor:
    if isinstance(module, DWShortcut):
        return shortcut_reference(module, *args)
    return block_reference(module, *args)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight and BN statistic moved off its init (zero biases and unit norms hide wrong slices)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


def check_against_reference(model: torch.nn.Module, run, reference_model: torch.nn.Module, x: Tensor) -> set[str]:
    """Runs ``run(x)``; every recorded block/shortcut output must equal the reference computed with the
    same-named module of ``reference_model``. Returns the mechanisms seen."""
    calls, handles = record_calls(model)
    try:
        with torch.no_grad():
            run(x)
    finally:
        for h in handles:
            h.remove()
    ref_modules = dict(reference_model.named_modules())
    seen = set()
    with torch.no_grad():
        for name, args, output in calls:
            expected = reference_of(ref_modules[name], (joined(args[0]), *args[1:]))
            diff = (joined(output) - expected).abs().max().item()
            assert diff <= TOL, f"{name}: max abs difference {diff:.2e}"
            seen |= mechanisms(args)
    assert calls
    return seen


def mechanisms(args) -> set[str]:
    if len(args) == 3:  # a shortcut
        return {"shortcut"} | ({"span>1 or multi-kernel"} if len(args[2]) > 1 else set())
    _x, geo, arch, _stage, block, _window = args
    seen = {block.mixer}
    seen |= {"window+global tokens"} if block.mixer == "window" and geo.n_global else set()
    seen |= {"life"} if block.life else set()
    seen |= {f"ffn {arch.ffn}"} | ({"ffn conv"} if block.ffn_kernel else set())
    seen |= {"cpe"} if arch.cpe else set()
    seen |= {"aux tokens"} if geo.n_aux else set()
    return seen


# ----------------------------------------------------------------------------- standalone models
def small_archs() -> dict[str, Arch]:
    """Small archs of every mechanism and both families (kept tiny: the references are slow)."""
    mixed = (
        Block(mixer="window", life=True, ffn_kernel=3),
        Block(mixer="dilated", dilations=(1, 2, 3), ffn_kernel=5),
        Block(mixer="global", life=True),
        Block(mixer="dilated", dilations=(3, 1, 3), life=True),
    )
    every = columnar(24, 3, depth=4, mlp_ratio=2, img_size=32, patch_size=4, num_classes=10, window=4)
    every = every.replace(stages=(every.stages[0].__class__(24, 3, 2, mixed),), stem="conv", cpe=True,
                          global_tokens=2, ffn="bidim", shortcuts=(Shortcut(0, 2, (3, 5)), Shortcut(2, 1, (7,))))
    return {
        "every mechanism (columnar)": every,
        "lightvit": lightvit((16, 32), (2, 4), (1, 2), tokens=3, img_size=64, window=4, num_classes=10, neck_dim=32),
        "dilateformer": dilateformer((12, 24), (3, 6), (1, 1), img_size=32, num_classes=10),
        "localvit": columnar(24, 4, depth=2, block=Block(ffn_kernel=3), ffn="localvit", img_size=32, patch_size=8,
                             num_classes=10),
        "localvit no conv, dw shortcut": columnar(24, 3, depth=2, ffn="localvit", img_size=32, patch_size=8,
                                                  num_classes=10, shortcuts=(Shortcut(0, 2, (3, 5, 7)),)),
    }


@pytest.mark.parametrize("name", list(small_archs()))
@pytest.mark.parametrize("training", [False, True])
def test_standalone_blocks_equal_the_reference(name, training):
    torch.manual_seed(0)
    model = perturbed(LocalityViT(small_archs()[name])).train(training)
    x = torch.randn(2, 3, model.arch.img_size, model.arch.img_size)
    seen = check_against_reference(model, model, model, x)
    if name.startswith("every"):
        assert {"window+global tokens", "dilated", "global", "life", "ffn conv", "cpe", "shortcut"} <= seen


def test_every_mechanism_is_covered():
    seen = set()
    for arch in small_archs().values():
        model = perturbed(LocalityViT(arch)).eval()
        seen |= check_against_reference(model, model, model, torch.randn(1, 3, arch.img_size, arch.img_size))
    assert {"window", "window+global tokens", "dilated", "global", "life", "ffn mlp", "ffn bidim", "ffn localvit",
            "ffn conv", "cpe", "aux tokens", "shortcut", "span>1 or multi-kernel"} <= seen


@pytest.mark.parametrize("name", ["every mechanism (columnar)", "lightvit", "dilateformer", "localvit"])
def test_standalone_block_gradients_equal_the_reference(name):
    """Input and weight gradients of every block, in training mode, against autograd through the reference."""
    torch.manual_seed(1)
    model = perturbed(LocalityViT(small_archs()[name])).train()
    x = torch.randn(2, 3, model.arch.img_size, model.arch.img_size)
    calls, handles = record_calls(model)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for name_, args, _ in calls:
        module = model.get_submodule(name_)
        params = [p for p in module.parameters() if p.requires_grad]
        x_in = joined(args[0]).detach().requires_grad_()
        cotangent = torch.randn_like(x_in)
        got = torch.autograd.grad(run_module(module, x_in, args), [x_in, *params], cotangent, allow_unused=True)
        want = torch.autograd.grad(reference_of(module, (x_in, *args[1:])), [x_in, *params], cotangent,
                                   allow_unused=True)
        for (pname, _), g, w in zip([("input", None), *module.named_parameters()], got, want):
            if w is None:
                assert g is None or not g.abs().max(), f"{name_}.{pname}: gradient where the reference has none"
                continue
            diff = (g - w).abs().max().item()
            assert diff <= 1e-4 * max(1.0, w.abs().max().item()), f"{name_}.{pname}: gradient differs by {diff:.2e}"


# ----------------------------------------------------------------------------- supernet subnets
RESOLUTION = {"tiny": 16, "tiny_columnar": 16}


@pytest.mark.parametrize("space_name", list(RESOLUTION))
def test_supernet_subnets_equal_the_reference(space_name):
    """Each block and shortcut of random subnets (slices of the supernet's weights), run inside the supernet,
    equals the reference with the weights of the extracted standalone model."""
    space = SearchSpace.load(space_name)
    torch.manual_seed(0)
    supernet = perturbed(Supernet(space, RESOLUTION[space_name])).eval()
    rng = random.Random(0)
    archs = [space.extreme(largest=True), space.extreme(largest=False)] + [space.sample(rng) for _ in range(8)]
    x = torch.randn(2, 3, RESOLUTION[space_name], RESOLUTION[space_name])
    seen = set()
    for arch in archs:
        standalone = supernet.extract(arch).eval()
        seen |= check_against_reference(supernet, lambda t: supernet(t, arch), standalone, x)
    assert {"window", "dilated", "global", "life", "ffn conv", "shortcut"} <= seen
