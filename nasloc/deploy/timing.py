"""Timing a forward pass: the fastest of several runs, on the threads the caller asks for."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def fastest_time_us(run: Callable[[], Any], sync: Callable[[], None] | None = None, warmup: int = 2,
                    min_runs: int = 5, max_runs: int = 50, min_seconds: float = 0.02) -> float:
    """Wall time of the fastest run of ``run()`` in microseconds, after ``warmup`` runs: at least ``min_runs``,
    more (up to ``max_runs``) until ``min_seconds`` are spent.

    The fastest, not the median: other processes only ever add time, so on a shared machine the fastest run
    is the most repeatable estimate of what the device itself takes (on an idle device the two agree). Parts
    and whole models are timed alike, so their sums compare."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    while len(times) < min_runs or (len(times) < max_runs and sum(times) < min_seconds):
        if sync is not None:
            sync()
        start = time.perf_counter()
        run()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return 1e6 * min(times)
