"""The selection phase on Ray Tune: the same ``selection`` study, with Ray's ASHA scheduler deciding who goes on.

Each candidate is a Ray trial that trains through the rungs (1, 2, 4, ... epochs, :func:`ray_rung_trial`) and
reports its score after each; ASHA (asynchronous successive halving, ``reduction_factor`` as with the plain
backend) stops the worse candidates at the rungs as their results come in, which keeps many workers busy
where the synchronous halving of :func:`nasloc.selection.study.run_selection` would wait for the slowest candidate
of each rung. A driver-side callback writes every reported score into the Optuna study as it arrives (the
workers may not see the storage), so the dashboard shows the learning curves live, and closes each candidate
as Ray lets it go: COMPLETE at the last rung, PRUNED where ASHA stopped it (so an interrupted selection does
not bring it back). A diverged candidate (NaN) ranks last for ASHA, as for the plain pruner. A candidate whose
Ray trial fails (a crash, out of memory) stays in the race and the selection ends with an error naming it. A
rerun resumes: scores already in the study are reported again without training, and each candidate's
training resumes from its checkpoint.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.storages import BaseStorage

from ..arch import Arch
from ..errors import first_line
from ..search.ray import cached, ray_session
from .candidates import Candidate
from .halving import SelectionResult, rung_epochs, selection_result
from .scores import all_scores, score_of
from .study import STUDY_NAME, alive_candidates, close_candidate, close_unfinished, open_selection, report
from .trainer import RungTrainer

RANKED = "ranked_score"  # what ASHA compares: the score, or -inf for a diverged (NaN) candidate


def ray_rung_trial(config: dict[str, Any], *, trainer_factory: Callable[[], RungTrainer], rungs: Sequence[int],
                   score: str = "val") -> None:
    """Ray worker: one candidate through the rungs, reporting each score (ASHA may stop it after any) and every
    score of its curve."""
    import torch
    from ray import tune

    torch.set_num_threads(1)  # one CPU per trial
    entry = config["candidate"]
    candidate = Candidate(entry["source"], Arch.from_dict(entry["arch"]), entry["search_trial"])
    trainer = cached(trainer_factory)
    rank_by = score_of(score)
    for epochs in rungs:
        known = entry["scored"].get(str(epochs))
        curve = None if known is not None else trainer(entry["number"], candidate, epochs)
        value = float(known if curve is None else rank_by(curve))
        # ASHA keeps a NaN going (NaN < cutoff is False): it ranks a diverged candidate by -inf instead.
        tune.report({"score": value, RANKED: value if math.isfinite(value) else -math.inf, "epochs": epochs,
                     "scores": None if curve is None else all_scores(curve)})


def _report_callback(study: optuna.Study, entries: list[dict[str, Any]], rungs: list[int]) -> Any:
    from ray.tune import Callback

    class ReportToOptuna(Callback):
        """Driver side: every score a worker reports becomes an intermediate value of its selection trial
        (once: a resumed candidate reports its stored scores again); a candidate that Ray lets go is closed."""

        def __init__(self) -> None:
            self.stored = {(e["trial_id"], int(epochs)) for e in entries for epochs in e["scored"]}

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            key = (trial.config["candidate"]["trial_id"], int(result["epochs"]))
            if key not in self.stored:
                report(study, key[0], float(result["score"]), key[1], result["scores"])
                self.stored.add(key)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            alive = {t.number: t for t in alive_candidates(study)}
            number = trial.config["candidate"]["number"]
            if number in alive:
                close_candidate(study, alive[number], rungs)

    return ReportToOptuna()


def run_ray_selection(candidates: Sequence[Candidate], trainer_factory: Callable[[], RungTrainer],
                      storage: BaseStorage, *, max_epochs: int, reduction_factor: int = 2,
                      ray_address: str | None = None, max_concurrent: int = 2, results_dir: str | Path,
                      resources_per_trial: dict[str, float] | None = None, held_out: int = 0,
                      score: str = "val", schedule_epochs: int | None = None,
                      say: Callable[[str], None] = print, study_name: str = STUDY_NAME) -> SelectionResult:
    """Run (or resume) the selection with Ray Tune's ASHA; returns the study and its ranking.

    ``trainer_factory()`` (picklable) runs once in each worker and returns the run's :class:`RungTrainer`
    (see :class:`nasloc.selection.trainer.TrainerSpec`). Ray is started as by :func:`nasloc.search.ray.run_ray_search`.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    rungs = rung_epochs(max_epochs, reduction_factor)
    study = open_selection(candidates, storage, rungs, reduction_factor, held_out, score, schedule_epochs, study_name)
    alive, failed = alive_candidates(study), {}
    if alive:
        say(f"[nasloc]   {len(alive)} candidates on Ray, up to {max_concurrent} at a time, ASHA over rungs {rungs}")
        entries = [dict(number=t.number, trial_id=t._trial_id, source=t.user_attrs["source"],
                        arch=t.user_attrs["arch"], search_trial=t.user_attrs["search_trial"],
                        scored={str(e): v for e, v in t.intermediate_values.items()}) for t in alive]
        trainable = tune.with_resources(
            tune.with_parameters(ray_rung_trial, trainer_factory=trainer_factory, rungs=tuple(rungs), score=score),
            resources_per_trial or {"cpu": 1})
        scheduler = ASHAScheduler(time_attr="epochs", metric=RANKED, mode="max", max_t=rungs[-1], grace_period=1,
                                  reduction_factor=reduction_factor)
        with ray_session(ray_address, max_concurrent):
            tuner = tune.Tuner(
                trainable,
                param_space={"candidate": tune.grid_search(entries)},
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=max_concurrent,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name=f"selection-{time.strftime('%Y%m%d-%H%M%S')}", verbose=0,
                                          storage_path=str(Path(results_dir).expanduser().resolve()),
                                          callbacks=[_report_callback(study, entries, rungs)]))
            grid = tuner.fit()
        # A worker's exception reaches the driver wrapped in a RayTaskError; its cause is what to name.
        failed = {result.config["candidate"]["number"]: getattr(result.error, "cause", None) or result.error
                  for result in grid if result.error}
    close_unfinished(study, rungs, keep=failed)
    if failed:
        number, error = next(iter(failed.items()))
        raise RuntimeError(f"{len(failed)} of the selection's Ray trials failed (selection trial {number}: "
                           f"{type(error).__name__}: {first_line(error)}); their Ray logs are under {results_dir}; "
                           "rerun to retry them (their scores so far are kept)")
    return selection_result(study)
