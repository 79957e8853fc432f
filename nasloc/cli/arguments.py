"""The command line's arguments: every parser of ``nasloc`` and ``run_search.py`` and their defaults (the value
types that parse and check them: :mod:`nasloc.cli.types`).

Torch-free (only the standard library and nasloc's torch-free modules), so ``--help`` and bad input answer at
once; :mod:`nasloc.cli.main` validates what argparse can't and dispatches to the handlers.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import NoReturn

from ..errors import NaslocError
from ..run import (
    BACKENDS,
    DATASETS,
    DEVICES,
    KEEP_CHECKPOINTS,
    OBJECTIVES,
    PHASES,
    SAMPLERS,
    SELECT_INITS,
    SELECT_SCORES,
    RunOptions,
)
from ..units import ACCEPTED_FORMS
from .types import band, budgets, float_at_least, int_in, latency_budget, objectives, recipe_type, run_name, user_path

LATENCY_BACKENDS = ("torch", "onnxruntime")
DEFAULTS = {field.name: field.default for field in dataclasses.fields(RunOptions)}


# nasloc train's recipe options: nasloc.training.recipe.RetrainConfig's fields with its defaults (a test checks that
# they agree), DeiT's recipe as the seed papers train; name: (default, metavar, help).
_RECIPE_OPTIONS = {
    "batch_size": (128, "N", "images per process"),
    "lr": (5e-4, "LR", "AdamW learning rate per 512 images, scaled linearly with the global batch"),
    "weight_decay": (0.05, "WD", "AdamW weight decay, not on norms, biases and position tables"),
    "warmup_epochs": (5, "N", "linear warm-up (at most a tenth of the run), then cosine decay"),
    "label_smoothing": (0.1, "EPS", "label smoothing"),
    "mixup": (0.8, "ALPHA", "mixup alpha, 0 = off"),
    "cutmix": (1.0, "ALPHA", "cutmix alpha, 0 = off"),
    "randaugment": ("rand-m9-mstd0.5-inc1", "SPEC", "timm RandAugment spec, '' = off"),
    "ema_decay": (0.0, "DECAY", "EMA of the weights, 0 = off; its val top-1 is recorded beside the export's"),
    "grad_clip": (5.0, "NORM", "gradient norm clipping, 0 = off"),
}
RECIPE = {name: default for name, (default, _, _) in _RECIPE_OPTIONS.items()}
DROP_PATH = 0.1  # a model argument: stochastic depth rising linearly to this rate in the last block
_EPILOG = """\
FLOPs convention: one multiply-add = one FLOP, as fvcore and the seed papers count, so GFLOPs = GMACs.
--budget 0.7GFLOPs means 0.7e9 multiply-adds per image at the search space's deploy resolution.

examples:
  %(prog)s --budget 0.7GFLOPs
  %(prog)s --budget 700M --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --device cuda
  %(prog)s --budget 0.7G --storage journal.log --workers 4 --dashboard
"""


class UsageError(NaslocError):
    """Bad command-line input found after parsing; the message is one line."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), not usage plus a line."""

    def error(self, message: str) -> NoReturn:
        print_error(self.prog, f"{message} (see {self.prog} --help)")
        sys.exit(2)


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the main command (``nasloc search`` / ``run_search.py``) to ``parser``."""
    parser.description = (
        "Train a weight-sharing supernet over the locality search space, search it with Optuna\n"
        "(or Ray Tune) under a FLOPs budget, retrain the best subnets and export them as timm\n"
        "models. Everything lands in RESULTS_DIR/RUN_NAME/."
    )
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    what = parser.add_argument_group("what to search")
    what.add_argument("--budget", required=True, type=budgets, metavar="BUDGET[,BUDGET...]",
                      help=f"FLOPs budget per image (multiply-adds), e.g. {ACCEPTED_FORMS}; required. A comma list "
                           "in increasing order (0.3G,0.5G,0.7G) makes a model family: one supernet over all the "
                           "budgets, then a search, selection, retrain and export per budget (export/<budget>/)")
    what.add_argument("--space", metavar="YAML", default=DEFAULTS["space"],
                      help="search space: a YAML file, or the name of a shipped space in search_spaces/ "
                           "(imagenet, cifar, tiny, ...) (default: %(default)s)")
    what.add_argument("--objectives", metavar="LIST", default=DEFAULTS["objectives"], type=objectives,
                      help=f"comma list from {','.join(OBJECTIVES)}; top1 is maximised, the rest minimised; latency "
                           "is predicted by the latency table of this machine (nasloc latency) "
                           f"(default: {','.join(DEFAULTS['objectives'])})")
    what.add_argument("--latency-budget", metavar="TIME", type=latency_budget,
                      help="a second budget beside --budget, e.g. 5ms or 500us: the batch-1 latency on --device as "
                           "the latency table predicts it (built on first use, see nasloc latency); archs over it "
                           "are not evaluated")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=DEFAULTS["dataset"], choices=DATASETS,
                      help="digits ships with scikit-learn (no download); cifar10/cifar100 read the official "
                           "python format; imagefolder reads an ImageFolder tree of class folders "
                           "(default: %(default)s)")
    data.add_argument("--data-dir", metavar="DIR", type=user_path,
                      help="data set folder; required for every data set but digits")
    data.add_argument("--proxy-img-size", metavar="PX", type=int_in(1),
                      help="image size for supernet training, search and selection (default: on real data the "
                           "smallest size at which every stage's token map is at least as wide as the widest "
                           "locality operation the space allows there (window, dilated neighbourhood, shortcut and "
                           "FFN kernels, LIFE), capped at the deploy size: 224 for the imagenet space; the digits: "
                           "32); a smaller size is warned about, naming the genes that lose their meaning")

    effort = parser.add_argument_group("effort")
    effort.add_argument("--supernet-epochs", metavar="N", type=int_in(0), default=DEFAULTS["supernet_epochs"],
                        help="supernet training epochs; 0 searches untrained weights (default: %(default)s)")
    effort.add_argument("--trials", metavar="N", type=int_in(1), default=DEFAULTS["trials"],
                        help="search trials, counting those already in a resumed study (default: %(default)s)")
    effort.add_argument("--select-top-k", metavar="K", type=int_in(0), default=DEFAULTS["select_top_k"],
                        help="search candidates (the best of each part of the MACs band) that compete with the "
                             "seed designs in the selection phase, short trainings with successive halving; 0 "
                             "skips selection and retrains the Pareto front by proxy (default: %(default)s)")
    effort.add_argument("--select-epochs", metavar="N", type=int_in(1), default=DEFAULTS["select_epochs"],
                        help="epochs of the selection's last rung; rungs are 1, 2, 4, ... epochs, and half the "
                             "candidates go on at each; the candidates train on the retrain's recipe and schedule "
                             "(--retrain-epochs) and stop at the rungs (default: a quarter of --retrain-epochs, at "
                             "least 4, at most --retrain-epochs)")
    effort.add_argument("--select-score", choices=SELECT_SCORES, default=DEFAULTS["select_score"],
                        help="what ranks the candidates at each rung: val, their top-1 on held-out images; tse, "
                             "the sum of their training losses (training speed); extrapolated, the top-1 a power "
                             "law fitted to their learning curve predicts at the retrain's end; complete, the "
                             "top-1 of a training whose schedule ends with the rung (each rung trains afresh) "
                             "(default: %(default)s)")
    effort.add_argument("--select-init", choices=SELECT_INITS, default=DEFAULTS["select_init"],
                        help="selection candidates start from scratch (it ranked better: results/benchmarks.md) "
                             "or from their supernet weights (fine-tuning) (default: %(default)s)")
    effort.add_argument("--batch-size", metavar="N", type=int_in(1), default=DEFAULTS["batch_size"],
                        help="images per step of the supernet training and of the selection's short trainings "
                             "(larger keeps a GPU busy; the selection scales its lr with it, the supernet keeps "
                             "its lr) (default: %(default)s)")
    effort.add_argument("--retrain-top-k", metavar="K", type=int_in(0), default=DEFAULTS["retrain_top_k"],
                        help="best candidates of the selection (or, without it, Pareto-optimal subnets by "
                             "proxy) to retrain from scratch, and with the selection also every candidate tied with "
                             "the best at its last rung; 0 skips retraining (default: %(default)s)")
    effort.add_argument("--retrain-epochs", metavar="N", type=int_in(1), default=DEFAULTS["retrain_epochs"],
                        help="epochs per retrained subnet (default: %(default)s)")
    effort.add_argument("--retrain-img-size", metavar="PX", type=int_in(1),
                        help="image size for retraining (default: the space's deploy resolution; with the "
                             "digits, the proxy's)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", choices=DEVICES, default=DEFAULTS["device"],
                     help="auto takes cuda when available (default: %(default)s)")
    run.add_argument("--seed", metavar="N", type=int_in(0), default=DEFAULTS["seed"],
                     help="seed for data split, sampler and training (default: %(default)s)")
    run.add_argument("--run-name", metavar="NAME", type=run_name,
                     help="run folder name; rerunning with the same name resumes the run "
                          "(default: <space>-<dataset>-<budget>, e.g. imagenet-digits-0.7G or tiny-digits-1.5M)")
    run.add_argument("--phase", choices=PHASES, default=DEFAULTS["phase"],
                     help="all: every phase; supernet: only train the supernet; search: only add trials to the "
                          "study with an already trained supernet (for extra workers on other machines sharing "
                          "--storage and the run folder) (default: %(default)s)")
    run.add_argument("--results-dir", metavar="DIR", type=user_path, default=DEFAULTS["results_dir"],
                     help="parent folder of the run folders (default: %(default)s)")
    run.add_argument("--dry-run", action="store_true",
                     help="check every input as a run does, print its plan (device, processes, sizes, MACs band, "
                          "per phase the epochs, images and estimated seconds, timed on the device) and write "
                          "nothing")
    run.add_argument("--json", action="store_true", help="with --dry-run: the plan as one JSON object")
    run.add_argument("--keep-checkpoints", choices=KEEP_CHECKPOINTS, default=DEFAULTS["keep_checkpoints"],
                     help="needed: what a resume needs and the weights each phase hands on (a finished phase keeps "
                          "no optimizer state and no previous checkpoint; a selection candidate the halving let go "
                          "keeps none); all: every checkpoint as written (default: %(default)s)")

    search = parser.add_argument_group("search engine")
    search.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS["sampler"],
                        help="Optuna sampler (default: %(default)s)")
    search.add_argument("--storage", metavar="URL|FILE",
                        help="Optuna storage: any Optuna URL (sqlite:///..., postgresql+psycopg2://...) or a "
                             "journal file path for several processes (default: "
                             "sqlite:///RESULTS_DIR/RUN_NAME/study.db)")
    search.add_argument("--backend", choices=BACKENDS, default=DEFAULTS["backend"],
                        help="run trials with plain Optuna or with Ray Tune + OptunaSearch "
                             "(default: %(default)s)")
    search.add_argument("--ray-address", metavar="ADDRESS",
                        help="address of a running Ray cluster (with --backend ray; default: start a local one)")
    search.add_argument("--workers", metavar="N", type=int_in(1), default=DEFAULTS["workers"],
                        help="search trials evaluated and selection candidates trained concurrently: processes "
                             "sharing the CPU threads (or the GPU), Ray trials with --backend ray "
                             "(default: %(default)s)")
    search.add_argument("--dashboard", action="store_true",
                        help="serve optuna-dashboard on localhost while searching")
    search.add_argument("--dashboard-port", metavar="PORT", type=int_in(1, 65535), default=DEFAULTS["dashboard_port"],
                        help="port for --dashboard (default: %(default)s)")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``nasloc export`` to ``parser``."""
    parser.description = "Export one trial of a run as a timm model folder (config.json, model.safetensors)."
    parser.add_argument("--run", metavar="RUN", required=True,
                        help="run folder, or a run name under ./results")
    parser.add_argument("--trial", metavar="N", required=True, type=int_in(0),
                        help="Optuna trial number to export")
    parser.add_argument("--budget", metavar="BUDGET", default="",
                        help="of a model family's run, the budget whose search holds the trial, as written on its "
                             "command line (e.g. 0.5G)")
    parser.add_argument("--out", metavar="DIR", type=user_path,
                        help="output folder (default: RUN/export/trial-N; a family's: RUN/export/BUDGET-trial-N)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx (torch's ONNX exporter), checked against the torch model, with "
                             "its ONNX Runtime latency in config.json (needs pip install 'nasloc[onnx]')")


def add_check_ranking_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``nasloc check-ranking`` to ``parser``."""
    parser.description = (
        "Check the run's supernet as a ranker: sample archs of one MACs band, score each by its proxy\n"
        "(supernet weights) and by a short standalone training (the run's data set and proxy resolution),\n"
        "and print both, Kendall tau and top-3 precision. The trainings are kept in RUN/check-ranking/;\n"
        "rerun the same command to resume them."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--run", metavar="RUN", required=True,
                        help="run folder, or a run name under ./results")
    parser.add_argument("--archs", metavar="N", type=int_in(3), default=10,
                        help="archs to sample and train, at least 3 (default: %(default)s)")
    parser.add_argument("--epochs", metavar="N", type=int_in(1), default=5,
                        help="standalone training epochs per arch (default: %(default)s)")
    parser.add_argument("--seed", metavar="N", type=int_in(0), default=0,
                        help="seed of the sample and of the trainings (default: %(default)s)")
    parser.add_argument("--band", metavar="LO,HI", type=band,
                        help="MACs band to sample, e.g. 20M,30M (default: 0.75 x the run's budget to its budget)")
    parser.add_argument("--budget", metavar="BUDGET", default="",
                        help="of a model family's run, the budget to check, as written on its command line (e.g. "
                             "0.5G): its band, its supernet proxy, trainings in RUN/BUDGET/check-ranking/")


_MODEL_HELP = ("a preset (nasloc presets), an arch file (.yaml/.json), an export folder, or RUN:TRIAL (trial "
               "TRIAL of a run folder or of a run name under ./results; RUN:BUDGET:TRIAL of a model family's run)")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=DEFAULTS["dataset"], choices=DATASETS,
                        help="digits ships with scikit-learn; cifar10/cifar100 read the official python format; "
                             "imagefolder an ImageFolder tree (default: %(default)s)")
    parser.add_argument("--data-dir", metavar="DIR", type=user_path,
                        help="data set folder; required for every data set but digits")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto takes cuda when available (default: %(default)s)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``nasloc train`` to ``parser``."""
    parser.description = (
        "Train a model from scratch with the retraining recipe (timm's transforms, RandAugment, mixup/cutmix,\n"
        "label smoothing, AdamW, cosine schedule with warm-up, optional EMA; AMP on CUDA; DDP under torchrun),\n"
        "checkpointing every epoch (rerun the same command to resume), then export it as a timm model to\n"
        "OUT/export with its val (and test) top-1."
    )
    parser.epilog = ("examples:\n"
                     "  %(prog)s --model nasloc_lightvit_tiny --dataset cifar10 --data-dir DIR --epochs 300\n"
                     "  %(prog)s --model results/imagenet-digits-0.7G/export/best --epochs 30 --img-size 32\n"
                     "  torchrun --nproc_per_node 4 -m nasloc train --model RUN:12 --dataset imagefolder "
                     "--data-dir DIR --epochs 300")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", metavar="M", required=True, help=_MODEL_HELP + "; its arch is trained from scratch")
    _add_data_arguments(parser)
    parser.add_argument("--epochs", metavar="N", type=int_in(1), required=True, help="training epochs; required")
    parser.add_argument("--img-size", metavar="PX", type=int_in(1),
                        help="training resolution (default: the model's own, 224 for the presets and the ImageNet "
                             "space; small images are upsampled on the device)")
    parser.add_argument("--out", metavar="DIR", type=user_path,
                        help="training folder: must not exist, or hold an unfinished training of the same options "
                             "(it resumes) (default: results/train/<model>-<dataset>-<img-size>px)")
    parser.add_argument("--seed", metavar="N", type=int_in(0), default=0,
                        help="seed of the train/val split, the initialisation and the augmentation "
                             "(default: %(default)s)")
    recipe = parser.add_argument_group("recipe (DeiT's, as the seed papers train)")
    for name, (default, metavar, text) in _RECIPE_OPTIONS.items():
        recipe.add_argument(f"--{name.replace('_', '-')}", metavar=metavar, type=recipe_type(name), default=default,
                            help=f"{text} (default: %(default)s)")
    recipe.add_argument("--drop-path", metavar="RATE", type=float_at_least(0, below=1), default=DROP_PATH,
                        help="stochastic depth, rising linearly to RATE in the last block (default: %(default)s)")
    recipe.add_argument("--workers", metavar="N", type=int_in(0), default=2,
                        help="data loading processes per training process (default: %(default)s)")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``nasloc evaluate`` to ``parser``."""
    parser.description = (
        "Measure a model on a split of a data set: top-1, top-5, parameters, MACs (multiply-adds: analytic for\n"
        "nasloc models, fvcore for timm's) and latency (batch 1 and a throughput batch). Models without\n"
        "weights (presets, arch files, timm names) are measured untrained."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", metavar="M", required=True,
                        help=_MODEL_HELP + ", or any timm model name (resnet18, deit_tiny_patch16_224; untrained)")
    _add_data_arguments(parser)
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="val: the held-out part of the training data (as nasloc train splits it); test: "
                             "CIFAR's test batch or an ImageFolder test/ folder (default: %(default)s)")
    parser.add_argument("--img-size", metavar="PX", type=int_in(1),
                        help="resolution (default: where the model's weights were trained, else its own)")
    parser.add_argument("--batch-size", metavar="N", type=int_in(1),
                        help="evaluation batch (default: the training's, as an export records it, else 128)")
    parser.add_argument("--seed", metavar="N", type=int_in(0),
                        help="seed of the train/val split (default: the training's, as an export or run records "
                             "it, else 0)")
    parser.add_argument("--throughput-batch", metavar="N", type=int_in(1), default=64,
                        help="batch of the throughput measurement (default: %(default)s)")
    parser.add_argument("--json", action="store_true", dest="as_json",
                        help="print one JSON object (top1, top5, params, macs, latency_ms, ...) instead of a table")


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``nasloc latency`` to ``parser``."""
    parser.description = (
        "Build (or refresh) the latency table of a search space on this machine: every distinct part of its archs\n"
        "(stem, block halves, downsampling, shortcuts, head) timed once, cached under ~/.cache/nasloc/latency/\n"
        "($NASLOC_LATENCY_DIR) per device, library versions, threads, batch size and resolution. Then predict N\n"
        "random archs (parts summed plus a fitted constant) and time them end to end; the last line is the median\n"
        "absolute error. The search's latency objective and --latency-budget use the same table."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--space", metavar="YAML", default=DEFAULTS["space"],
                        help="search space: a YAML file or a shipped space name (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    parser.add_argument("--backend", choices=LATENCY_BACKENDS, default="torch",
                        help="torch eager (inference mode) or ONNX Runtime on the CPU, which exports every part "
                             "(slow to build; needs pip install 'nasloc[onnx]') (default: %(default)s)")
    parser.add_argument("--batch-size", metavar="B", type=int_in(1), default=1, help="(default: %(default)s)")
    parser.add_argument("--archs", metavar="N", type=int_in(1), default=20,
                        help="random archs to check the prediction on (default: %(default)s)")
    parser.add_argument("--seed", metavar="N", type=int_in(0), default=0,
                        help="seed of the archs checked (default: %(default)s)")
    parser.add_argument("--refresh", action="store_true", help="time every part again")


def build_parser() -> argparse.ArgumentParser:
    """The ``nasloc`` command with its subcommands."""
    parser = _Parser(prog="nasloc", description="Neural architecture search over the locality mechanisms "
                                                "of vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_search_arguments(commands.add_parser("search", help="run the whole search (same as run_search.py)"))
    add_export_arguments(commands.add_parser("export", help="export a trial as a timm model"))
    add_check_ranking_arguments(commands.add_parser("check-ranking", help="check how well the proxy ranks archs"))
    add_train_arguments(commands.add_parser("train", help="train a preset, arch, export or trial from scratch"))
    add_evaluate_arguments(commands.add_parser("evaluate", help="top-1/top-5, params, MACs and latency of a model"))
    add_latency_arguments(commands.add_parser("latency", help="build the latency table of a space on this machine"))
    commands.add_parser("presets", help="list the seed presets",
                        description="The registered presets: seed paper, params, MACs at their resolution, input size.")
    return parser


def build_search_parser(prog: str = "run_search.py") -> argparse.ArgumentParser:
    """The main command on its own, as ``run_search.py`` offers it."""
    parser = _Parser(prog=prog)
    add_search_arguments(parser)
    parser.set_defaults(command="search")
    return parser
