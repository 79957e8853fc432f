"""The whole job behind ``run_search.py``: supernet -> search -> report -> retrain -> export.

Every phase writes into ``results/<run>/`` and is resumable: the supernet from its last epoch
checkpoint, the search from its Optuna storage (a rerun continues to ``--trials``), retraining from
each subnet's last epoch, and a finished phase is not redone. Options come validated from
:mod:`nasloc.cli`.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .arch import Arch
from .data import DataSplits, load_dataset
from .errors import NaslocError
from .evaluate import EvaluatorSpec, make_evaluator, measure_latency
from .flops import count
from .space import SearchSpace
from .supernet import Supernet
from .supernet_train import Band, SupernetConfig, load_supernet, train_supernet
from .train import RetrainConfig, resolve_device, retrain
from .units import format_macs

# The supernet trains on archs with MACs in [BAND_LOW * budget, budget]: the part of the space the
# search cares about (NASViT/ElasticViT sample inside the FLOPs band too).
BAND_LOW = 0.5
STUDY_NAME = "nasloc"


class BudgetError(NaslocError):
    """The budget lies outside what the search space can build."""


class PhaseError(NaslocError):
    """A phase was asked for before the one it needs."""


def run_pipeline(options: argparse.Namespace) -> Path:
    """Run (or resume) every phase; returns the run folder."""
    started = time.time()
    space = SearchSpace.load(options.space)
    check_budget(space, options.budget)
    run_dir = Path(options.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    proxy_size = options.proxy_img_size or default_proxy_size(space)
    splits = load_dataset(options.dataset, options.data_dir, proxy_size, seed=options.seed)
    space = space.for_classes(splits.num_classes)
    _write_json(run_dir / "run.json", {**_run_record(options), "mean": splits.mean, "std": splits.std, "proxy_img_size": proxy_size})
    _say(f"[nasloc] run {run_dir} | budget {format_macs(options.budget)} at {space.img_size} px | "
         f"space {space.name} ({format_macs(space.macs_range()[0])} - {format_macs(space.macs_range()[1])}) | "
         f"proxy {proxy_size} px on {options.dataset} | device {device}")

    supernet = Supernet(space, proxy_size).to(device)
    band = Band(max(space.macs_range()[0], BAND_LOW * options.budget), options.budget)
    if options.phase == "search":
        checkpoint = trained_checkpoint(supernet, run_dir, options.supernet_epochs, device)
    else:
        checkpoint = train_phase(supernet, splits, band, options, run_dir, device)
    if options.phase == "supernet":
        return run_dir
    study = search_phase(supernet, splits, space, checkpoint, options, run_dir, proxy_size)
    if options.phase == "search":
        return run_dir
    references = reference_points(space, supernet, splits, options)
    pareto = report_phase(study, options, run_dir, references)
    retrained = retrain_phase(pareto, space, splits, options, run_dir, proxy_size)
    export_dir = export_phase(retrained, options, run_dir, splits)
    write_summary(run_dir, options, space, pareto, retrained, references, export_dir, time.time() - started)
    _say(f"[nasloc] done in {time.time() - started:.0f} s: {run_dir / 'summary.md'}")
    return run_dir


# ------------------------------------------------------------------------------------ checks
def check_budget(space: SearchSpace, budget: float) -> None:
    lo, hi = space.macs_range()
    if not lo <= budget <= hi:
        raise BudgetError(
            f"budget {format_macs(budget)} is outside the space {space.name}: its archs span "
            f"{format_macs(lo)} to {format_macs(hi)} at {space.img_size} px"
        )


def default_proxy_size(space: SearchSpace) -> int:
    """The smallest size >= 32 px at which every arch of the space is valid (and at most the
    deploy size): a multiple of the total stride of stem and downsampling."""
    stride = int(space.skeleton.get("patch_size", 16)) * 2 ** (len(space.stages) - 1)
    size = stride * max(1, -(-32 // stride))
    return min(size, space.img_size)


# ------------------------------------------------------------------------------------ phases
def train_phase(supernet: Supernet, splits: DataSplits, band: Band, options: Any, run_dir: Path, device: torch.device) -> Path:
    cfg = SupernetConfig(epochs=options.supernet_epochs, seed=options.seed)
    _say(f"[nasloc] 1/5 supernet: {cfg.epochs} epochs, sandwich rule in the band {format_macs(band.lo)} - {format_macs(band.hi)}")
    result = train_supernet(supernet, splits, band, cfg, run_dir / "supernet", device=str(device))
    return result.checkpoint


def trained_checkpoint(supernet: Supernet, run_dir: Path, epochs: int, device: torch.device) -> Path:
    """The finished supernet checkpoint of the run, loaded into ``supernet`` (for --phase search)."""
    path = run_dir / "supernet" / "last.pth"
    done = torch.load(path, map_location="cpu", weights_only=False)["epoch"] + 1 if path.exists() else 0
    if done < epochs:
        raise PhaseError(f"the supernet of {run_dir} has {done}/{epochs} epochs; train it first with --phase supernet (same options)")
    load_supernet(path, supernet, device)
    return path


def search_phase(supernet: Supernet, splits: DataSplits, space: SearchSpace, checkpoint: Path, options: Any, run_dir: Path, proxy_size: int):
    _say(f"[nasloc] 2/5 search: {options.trials} trials, {options.sampler}, storage {options.storage}")
    dashboard = serve_dashboard(options.storage, options.dashboard_port) if options.dashboard else None
    latency = (lambda arch: measure_latency(arch, options.device if options.device != "auto" else "cpu")) if "latency" in options.objectives else None
    common = dict(
        budget_macs=options.budget, storage=options.storage, study_name=STUDY_NAME, n_trials=options.trials,
        sampler=options.sampler, seed=options.seed, objectives=tuple(options.objectives),
    )
    try:
        if options.backend == "ray":
            from .ray_search import run_ray_search

            factory = EvaluatorSpec(str(space.source), str(checkpoint), proxy_size, options.dataset,
                                    None if options.data_dir is None else str(options.data_dir), options.seed)
            return run_ray_search(space, factory, ray_address=options.ray_address, max_concurrent=options.workers,
                                  results_dir=str(run_dir / "ray"), **common)
        from .search import run_search

        evaluate = make_evaluator(supernet, splits, seed=options.seed)
        return run_search(space, evaluate, latency=latency, workers=options.workers, **common)
    finally:
        if dashboard is not None:
            dashboard.shutdown()


def reference_points(space: SearchSpace, supernet: Supernet, splits: DataSplits, options: Any) -> dict[str, tuple[float, float]]:
    """Each seed mechanism alone in the space, within budget, with its proxy top-1 (supernet weights)."""
    evaluate = make_evaluator(supernet, splits, seed=options.seed)
    return {name: (count(arch).macs, evaluate(arch)) for name, arch in space.reference_archs(options.budget).items()}


def report_phase(study, options: Any, run_dir: Path, references: dict[str, tuple[float, float]]) -> list:
    from .report import write_pareto_html, write_tables
    from .search import pareto_trials

    _say("[nasloc] 3/5 report: trials.csv, pareto.csv, pareto.html")
    write_tables(study, options.budget, run_dir)
    write_pareto_html(study, options.budget, run_dir, references)
    return pareto_trials(study, options.budget)


def retrain_phase(pareto: list, space: SearchSpace, splits: DataSplits, options: Any, run_dir: Path, proxy_size: int) -> list[dict[str, Any]]:
    """Retrain the best ``--retrain-top-k`` Pareto trials (by proxy top-1) from scratch."""
    chosen = sorted(pareto, key=lambda t: t.user_attrs["top1"], reverse=True)[: options.retrain_top_k]
    size = options.retrain_img_size or default_retrain_size(space, options.dataset, proxy_size)
    if chosen:
        _say(f"[nasloc] 4/5 retrain: {len(chosen)} Pareto trials at {size} px, {options.retrain_epochs} epochs each")
    data = splits if size == splits.img_size else load_dataset(options.dataset, options.data_dir, size, seed=options.seed)
    results = []
    for trial in chosen:
        arch = Arch.from_dict(trial.user_attrs["arch"]).replace(img_size=size)
        from .models import LocalityViT

        model = LocalityViT(arch, drop_path_rate=0.1)
        cfg = RetrainConfig(epochs=options.retrain_epochs, img_size=size, seed=options.seed, mixup=0.0, cutmix=0.0, ema_decay=0.0)
        out = run_dir / "retrain" / f"trial_{trial.number}"
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / "arch.json", arch.to_json(indent=2))
        result = retrain(model, data, cfg, out, device=options.device)
        weights = out / "best.safetensors"
        _save_weights(model, weights)
        results.append(dict(trial=trial.number, arch=arch, proxy_top1=trial.user_attrs["top1"], macs=count(arch.replace(img_size=space.img_size)).macs,
                            params=count(arch).params, val_top1=result.val_top1, weights=weights, model=model))
    return results


def default_retrain_size(space: SearchSpace, dataset: str, proxy_size: int) -> int:
    """The deploy resolution, except for the embedded 8x8 digits: upsampling them to 224 px would
    cost CPU hours for nothing, so they retrain at the proxy resolution."""
    return proxy_size if dataset == "digits" else space.img_size


def export_phase(retrained: list[dict[str, Any]], options: Any, run_dir: Path, splits: DataSplits) -> Path | None:
    if not retrained:
        return None
    from .export import export_model

    best = max(retrained, key=lambda r: r["val_top1"])
    target = run_dir / "export" / "best"
    info = dict(trial=best["trial"], macs_at_deploy=best["macs"], params=best["params"], proxy_top1=best["proxy_top1"],
                retrained_top1=best["val_top1"], budget_macs=options.budget, dataset=options.dataset)
    _say(f"[nasloc] 5/5 export: trial {best['trial']} -> {target}")
    return export_model(best["model"], target, info=info, mean=splits.mean, std=splits.std, overwrite=True)


# ------------------------------------------------------------------------------------ outputs
def write_summary(run_dir: Path, options: Any, space: SearchSpace, pareto: list, retrained: list[dict[str, Any]],
                  references: dict[str, tuple[float, float]], export_dir: Path | None, seconds: float) -> None:
    lines = [
        f"# nasloc run `{run_dir.name}`",
        "",
        f"Budget {format_macs(options.budget)} per image at {space.img_size} px (1 multiply-add = 1 FLOP); "
        f"space `{space.name}`; data `{options.dataset}`; {options.trials} trials ({options.sampler}); {seconds:.0f} s.",
        "",
        "## Pareto front (proxy top-1 with supernet weights)",
        "",
        "| trial | proxy top-1 (%) | GMACs | params (M) |",
        "|---|---|---|---|",
    ]
    for t in sorted(pareto, key=lambda t: t.user_attrs["macs"]):
        lines.append(f"| {t.number} | {t.user_attrs['top1']:.2f} | {t.user_attrs['macs'] / 1e9:.4f} | {t.user_attrs['params'] / 1e6:.3f} |")
    lines += ["", "## Seed mechanisms alone in this space (largest within budget)", "", "| design | proxy top-1 (%) | GMACs |", "|---|---|---|"]
    lines += [f"| {name} | {top1:.2f} | {macs / 1e9:.4f} |" for name, (macs, top1) in references.items()]
    lines += ["", "## Retrained from scratch", "", "| trial | val top-1 (%) | proxy top-1 (%) | GMACs at deploy | params (M) |", "|---|---|---|---|---|"]
    lines += [f"| {r['trial']} | {r['val_top1']:.2f} | {r['proxy_top1']:.2f} | {r['macs'] / 1e9:.4f} | {r['params'] / 1e6:.3f} |" for r in retrained]
    if export_dir is not None:
        lines += ["", f"Best model exported to `{export_dir}`:", "",
                  f"    import nasloc, timm; timm.create_model(\"local-dir:{export_dir}\", pretrained=True)"]
    _write_text(run_dir / "summary.md", "\n".join(lines) + "\n")


def _run_record(options: argparse.Namespace) -> dict[str, Any]:
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    record["study_name"] = STUDY_NAME
    return record


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str))


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _say(message: str) -> None:
    print(message, flush=True)


def serve_dashboard(storage: str, port: int):
    """optuna-dashboard on 127.0.0.1:port in a daemon thread; returns the server (call shutdown())."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard

    from .search import open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep request logs out of the progress bars
            pass

    server = make_server("127.0.0.1", port, optuna_dashboard.wsgi(open_storage(storage)), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _say(f"[nasloc] dashboard: http://127.0.0.1:{port}/dashboard")
    return server
