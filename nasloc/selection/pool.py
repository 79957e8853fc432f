"""Several selection trainings at once (``--workers N`` with the plain Optuna backend).

The candidates of a rung train independently, so the selection can hand them to N processes. Each process
rebuilds the run's :class:`nasloc.selection.trainer.RungTrainer` once from a picklable
:class:`nasloc.selection.trainer.TrainerSpec` (supernet checkpoint, data, selection config, run folder) and trains
the candidates it is handed; the curves come back as the trainings end, and the selection reports each at once
(a crash keeps the finished ones). Every training is seeded and checkpointed in its own folder, as one at a
time, so the scores are those of one at a time up to float summation order (a process gets its share of the
threads). On a GPU the processes share the card: small nets are bound by kernel launches, and several keep it
busy where one leaves it mostly idle.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from ..errors import NaslocError

if TYPE_CHECKING:
    from .candidates import Candidate
    from .scores import Curve
    from .trainer import TrainerSpec


Job = tuple[int, "Candidate", int]  # (selection trial number, candidate, epochs in all)
_trainer: Any = None  # the RungTrainer of a pool process


class SelectionWorkerDied(NaslocError):
    """A selection process ended without returning its curve (killed, out of memory)."""


class RungPool:
    """``workers`` spawned processes, each with ``threads`` torch threads, training selection candidates."""

    def __init__(self, spec: TrainerSpec, workers: int, threads: int):
        # spawn, not fork: a forked child would copy torch's thread pools in the middle of their use
        self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start,
                                             initargs=(spec, threads, multiprocessing.get_start_method()))

    def train(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Curve]]:
        """(trial number, learning curve) of each job, in the order the trainings end."""
        futures: dict[Future, int] = {self._executor.submit(_advance, *job): job[0] for job in jobs}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BrokenProcessPool as error:
            raise SelectionWorkerDied("a selection process died (killed, or out of memory?); rerun the same "
                                      "command to resume: the rungs already scored are kept") from error
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RungPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start(spec: TrainerSpec, threads: int, start_method: str) -> None:
    import torch

    global _trainer
    # A spawned process starts its own children by spawn: each training's DataLoader workers would import torch
    # anew (seconds per training); they start as in the parent process instead (fork on Linux).
    multiprocessing.set_start_method(start_method, force=True)
    torch.set_num_threads(threads)
    _trainer = spec()


def _advance(number: int, candidate: Candidate, epochs: int) -> Curve:
    return _trainer(number, candidate, epochs)
