"""``nasloc latency``: build this machine's latency table of a space and check its predictions."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..console import say
from ..space.flops import count
from .shared import print_table


# ===================================================================================== latency
def latency_command(*, space: Path, device: str, backend: str, batch_size: int, archs: int, seed: int,
                    refresh: bool) -> float:
    """Build (or refresh) the latency table of ``space`` on this machine, then predict ``archs`` random archs and
    time them end to end; prints a table and, last, the median absolute error (returned, in %)."""
    import random

    from ..deploy.latency import Target, build_latency_model, fit_key, measure_archs_us
    from ..space.search_space import SearchSpace

    target = Target(device, backend, batch_size)
    loaded = SearchSpace.load(space)
    started = time.perf_counter()
    model, table = build_latency_model(loaded, target, refresh=refresh)
    say(f"[nasloc] latency table of {loaded.name}: {len(table.parts)} parts on {table.meta['device']} "
         f"({backend}, batch {batch_size}, {table.meta['threads']} thread(s)), ready in "
         f"{time.perf_counter() - started:.0f} s: {table.path}")
    say(f"[nasloc] fitted constant: {model.constant_us:.0f} us (archs timed end to end: "
         f"{table.fits[fit_key(loaded)]['archs']})")
    rng = random.Random(seed)
    sample = [loaded.sample(rng) for _ in range(archs)]
    rows, errors = [], []
    for i, (arch, measured) in enumerate(zip(sample, measure_archs_us(sample, target))):
        predicted = model.predict_us(arch)
        errors.append(100 * abs(predicted - measured) / measured)
        rows.append((str(i + 1), f"{count(arch).macs / 1e6:.1f}", f"{predicted / 1000:.3f}", f"{measured / 1000:.3f}",
                     f"{errors[-1]:.1f}"))
    print(print_table(("arch", "MMACs", "predicted ms", "measured ms", "error %"), rows))
    error = statistics.median(errors)
    print(f"median absolute error: {error:.1f} %")
    return error
