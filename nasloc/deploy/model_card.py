"""The model card of an export: the ``README.md`` that the Hugging Face layout (which timm reads) keeps beside
``config.json``, written from the export's own facts (its ``nasloc`` block) and arch."""
from __future__ import annotations

from typing import Any

from ..arch import Arch
from ..arch_view import LEGEND, locality, stage_table
from ..units import format_macs

RECIPE_KEYS = ("lr", "batch_size", "warmup_epochs", "weight_decay", "label_smoothing", "mixup", "cutmix",
               "randaugment", "drop_path", "ema_decay")


def model_card(config: dict[str, Any], arch: Arch, name: str) -> str:
    """Markdown with a metadata header: what the model is, its picture (``arch.svg``), its numbers, its arch
    per stage, and how to load it."""
    facts = config.get("nasloc", {})
    design = facts.get("design") or ("searched" if "trial" in facts else facts.get("model", "a nasloc arch"))
    design = "searched by nasloc" if design == "searched" else design
    top1 = facts.get("retrained_top1", facts.get("val_top1"))
    epochs = facts.get("retrain_epochs", facts.get("epochs"))
    rows = [("design", design), ("search trial", facts.get("trial")), ("search space", facts.get("space")),
            ("MACs", format_macs(facts["macs"]) + f" at {arch.img_size} px"),
            ("params", f"{facts['params'] / 1e6:.3f} M"),
            ("data", f"{facts.get('dataset', '?')}, {arch.num_classes} classes"),
            ("validation top-1", None if top1 is None else f"{top1:.2f} %"
             + (f" on {facts['val_images']} images" if facts.get("val_images") else "")),
            ("test top-1", None if facts.get("test_top1") is None else f"{facts['test_top1']:.2f} %"),
            ("trained", None if epochs is None else f"{epochs} epochs at {facts.get('train_img_size', arch.img_size)} px"
             + (f", seed {facts['seed']}" if "seed" in facts else "")),
            ("recipe", _recipe(facts.get("recipe"))), ("budget", None if "budget_macs" not in facts
                                                        else format_macs(facts["budget_macs"])),
            ("locality", locality(arch))]
    cfg = config.get("pretrained_cfg", {})
    return "\n".join([
        "---", "library_name: timm", "license: apache-2.0", "tags:", "- image-classification", "- timm", "- nasloc",
        "---", "", f"# {name}", "",
        f"A vision transformer of the nasloc family (`nasloc_vit`): {design}.", "",
        "![the arch: stages, blocks coloured by token mixer, LIFE and FFN conv marks, shortcuts as arcs]"
        "(arch.svg)", "",
        "| | |", "|---|---|", *(f"| {label} | {value} |" for label, value in rows if value is not None), "",
        "## Arch", "", *stage_table(arch), "", f"Legend: {LEGEND}.", "",
        "## Load it", "",
        "    import nasloc, timm  # nasloc registers the family with timm",
        f'    model = timm.create_model("local-dir:{name}", pretrained=True)',
        "",
        f"Input {arch.img_size} x {arch.img_size} px, normalised with mean {cfg.get('mean')} and std "
        f"{cfg.get('std')}; evaluation resizes and centre-crops {cfg.get('crop_pct', 0.875):.3f} "
        f"({cfg.get('interpolation', 'bicubic')}). `config.json` holds the arch (`model_args`) and these facts "
        "(`nasloc`).", "",
    ])


def _recipe(recipe: dict[str, Any] | None) -> str | None:
    if not recipe:
        return None
    return ", ".join(f"{key.replace('_', ' ')} {recipe[key] or 'off'}" for key in RECIPE_KEYS if key in recipe)
