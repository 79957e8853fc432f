"""CUDA path checks of the models, run by bench/gpu_evidence.sh on a GPU machine (CPU only: it says so and stops).

Every mechanism (the seed designs of search_spaces/cifar.yaml and random archs of it, which mix them):
- the CUDA fp32 forward equals the CPU one (eval mode, max abs difference printed, fail above 1e-4), and so do the
  gradients (relative difference, fail above 1e-3: CUDA convolutions run in TF32);
- an AMP training step (autocast as nasloc.training.retrain uses it: bf16 where supported, else fp16) gives a finite loss and
  finite gradients, and its gradients point the way of the fp32 ones (cosine similarity printed, fail below 0.99);
- dilated attention's backward: the same on a net of dilated blocks only;
- with ``--supernet``: subnets of the supernet (elastic, sliced layers) in two MACs bands, the same checks;
- dilated attention on CUDA, masked dense SDPA (what small maps take) against shift and multiply: the largest
  difference of outputs and gradients, and the forward + backward time of each under autocast (a ratio).
One line per check, ``CHECK <name>: ok|FAIL <numbers>``; the exit status is the number of failures.
"""
from __future__ import annotations

import copy
import random
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from nasloc.arch import Arch, Block
from nasloc.models import LocalityViT
from nasloc.space.search_space import SearchSpace
from nasloc.space.seed_designs import reference_archs
from nasloc.training.distributed import amp_dtype


def archs_to_check() -> dict[str, Arch]:
    space = SearchSpace.load("cifar").for_classes(10)
    archs = dict(reference_archs(space, 0.03e9))
    rng = random.Random(0)
    archs.update({f"random {i}": space.sample(rng) for i in range(4)})
    return archs


def gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
              arch: Arch | None = None) -> torch.Tensor:
    """All parameter gradients of one cross-entropy step, flattened (autocast when dtype is given); with ``arch``
    the model is a supernet and runs that subnet."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x) if arch is None else model(x, arch)
        loss = F.cross_entropy(out.float(), y)
    if not torch.isfinite(loss):
        raise AssertionError(f"loss {loss.item()}")
    loss.backward()
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def check_arch(name: str, arch: Arch, dev: torch.device) -> list[str]:
    failures = []
    torch.manual_seed(0)
    cpu_model = LocalityViT(arch).eval()
    gpu_model = copy.deepcopy(cpu_model).to(dev)
    x = torch.randn(8, 3, arch.img_size, arch.img_size)
    y = torch.randint(0, arch.num_classes, (8,))
    with torch.no_grad():
        forward_diff = (gpu_model(x.to(dev)).cpu() - cpu_model(x)).abs().max().item()
    cpu_model.train()
    gpu_model.train()
    fp32_cpu = gradients(cpu_model, x, y, None)
    fp32_gpu = gradients(gpu_model, x.to(dev), y.to(dev), None)
    # relative: CUDA's convolutions run in TF32 by default, which moves deep nets' gradients by ~1e-4 absolute
    grad_diff = ((fp32_gpu.cpu() - fp32_cpu).norm() / fp32_cpu.norm()).item()
    amp = gradients(gpu_model, x.to(dev), y.to(dev), amp_dtype(None, dev))
    finite = bool(torch.isfinite(amp).all())
    cosine = F.cosine_similarity(amp, fp32_gpu, dim=0).item()
    ok = forward_diff <= 1e-4 and grad_diff <= 1e-3 and finite and cosine >= 0.99
    print(f"CHECK {name}: {'ok' if ok else 'FAIL'} forward cuda-cpu {forward_diff:.1e}, fp32 grads cuda-cpu relative "
          f"{grad_diff:.1e}, AMP grads finite {finite}, cosine(AMP, fp32) {cosine:.4f} [{arch.describe()}]", flush=True)
    if not ok:
        failures.append(name)
    return failures


def check_supernet(dev: torch.device, band_high: float, n: int = 12) -> list[str]:
    """Subnets of the weight-sharing supernet (sliced, elastic layers): CUDA fp32 equals CPU, AMP grads finite."""
    from nasloc.supernet.supernet import Supernet
    space = SearchSpace.load("cifar").for_classes(10)
    torch.manual_seed(0)
    cpu_net = Supernet(space, 32).train()
    gpu_net = copy.deepcopy(cpu_net).to(dev)
    rng = random.Random(1)
    failures = []
    for i in range(n):
        arch = space.sample_in_band(rng, 20e6, band_high)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        name = f"supernet subnet {i} (<= {band_high / 1e6:.0f} MMACs)"
        try:
            with torch.no_grad():
                out_diff = (gpu_net(x.to(dev), arch).cpu() - cpu_net(x, arch)).abs().max().item()
            cpu_grads = gradients(cpu_net, x, y, None, arch)
            gpu_grads = gradients(gpu_net, x.to(dev), y.to(dev), None, arch).cpu()
            if dev.type == "cuda":
                torch.cuda.synchronize()  # an illegal access is reported here, by the subnet that made it
            grad_diff = ((gpu_grads - cpu_grads).norm() / cpu_grads.norm()).item()
            amp = gradients(gpu_net, x.to(dev), y.to(dev), amp_dtype(None, dev), arch)
            finite = bool(torch.isfinite(amp).all())
            ok = out_diff <= 1e-3 and grad_diff <= 1e-3 and finite
            print(f"CHECK {name}: {'ok' if ok else 'FAIL'} output cuda-cpu {out_diff:.1e}, grads relative "
                  f"{grad_diff:.1e}, AMP grads finite {finite} [{arch.describe()}]", flush=True)
        except Exception as e:
            ok = False
            print(f"CHECK {name}: FAIL {type(e).__name__}: {str(e)[:300]} [{arch.describe()}]", flush=True)
        if not ok:
            failures.append(name)
    return failures


def check_dilated_forms(dev: torch.device, repeats: int = 20) -> list[str]:
    """Masked dense SDPA vs shift and multiply on CUDA: equal outputs and gradients (fp32), and their speed
    (forward + backward under autocast, median of ``repeats``) on the CIFAR maps, batch 256, 3 heads of 32."""
    from nasloc.models.dilated import masked_dense_attention, shift_multiply_attention
    from nasloc.models.layout import Geometry
    failures = []
    for side in (8, 16):
        geo, dilations = Geometry(side, side, 0, 0), (1, 2, 3)
        leaves = [torch.randn(256, 3, side * side, 32, device=dev, requires_grad=True) for _ in range(3)]
        grad_out = torch.randn(256, 3, side * side, 32, device=dev)
        results, times = [], []
        for form in (shift_multiply_attention, masked_dense_attention):
            out = form(*leaves, geo, dilations, 3)
            results.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
            times.append(_median_step_ms(lambda: form(*leaves, geo, dilations, 3), leaves, grad_out, dev, repeats))
        diff = max((a - b).abs().max().item() for a, b in zip(*results))
        ok = diff <= 1e-4
        print(f"CHECK dilated {side}x{side} masked dense vs shift-multiply: {'ok' if ok else 'FAIL'} max diff "
              f"{diff:.1e}; AMP fwd+bwd shift-multiply {times[0]:.2f} ms, dense {times[1]:.2f} ms (ratio {times[0] / times[1]:.2f})",
              flush=True)
        if not ok:
            failures.append(f"dilated {side}x{side}")
    return failures


def _median_step_ms(forward, leaves: list[torch.Tensor], grad_out: torch.Tensor, dev: torch.device,
                    repeats: int) -> float:
    times = []
    for _ in range(repeats + 3):
        torch.cuda.synchronize(dev)
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp_dtype(None, dev)):
            out = forward()
        torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[3:])


def main() -> int:
    if not torch.cuda.is_available():
        print("CHECK cuda: FAIL no CUDA device")
        return 1
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, AMP dtype {amp_dtype(None, dev)}")
    archs = archs_to_check()
    plain = archs["plain ViT"]  # 3 heads: one dilation rate each
    stage = replace(plain.stages[0], blocks=tuple(Block(mixer="dilated", dilations=(1, 2, 3)) for _ in plain.stages[0].blocks))
    archs["dilated rates 1,2,3"] = replace(plain, stages=(stage,))
    failures = []
    for name, arch in archs.items():
        try:
            failures += check_arch(name, arch, dev)
        except Exception as e:  # report and go on: one broken mechanism should not hide the others
            print(f"CHECK {name}: FAIL {type(e).__name__}: {e}", flush=True)
            failures.append(name)
    total = len(archs)
    failures += check_dilated_forms(dev)
    total += 2
    if "--supernet" in sys.argv:
        for high in (0.03e9, 0.1e9):
            failures += check_supernet(dev, high)
            total += 12
    print(f"gpu_checks: {total - len(failures)}/{total} ok")
    return len(failures)


if __name__ == "__main__":
    sys.exit(main())
