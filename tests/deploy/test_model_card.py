"""The model card an export carries (README.md beside config.json): facts from the export, its arch, how to load."""
from __future__ import annotations

from nasloc.arch import Arch, Block, Stage
from nasloc.deploy.model_card import model_card

ARCH = Arch(stages=(Stage(24, 3, 2.0, (Block(mixer="window"), Block(ffn_kernel=3))),), img_size=32, num_classes=10,
            global_tokens=2)
CONFIG = {"pretrained_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875, "interpolation": "bicubic"},
          "nasloc": {"trial": 36, "design": "searched", "macs": 24_771_936, "params": 366_445, "dataset": "cifar10",
                     "retrained_top1": 82.26, "val_images": 5000, "retrain_epochs": 30, "seed": 0, "space": "cifar",
                     "recipe": {"lr": 0.004, "batch_size": 128, "mixup": 0.0, "randaugment": ""}}}


def test_the_card_states_what_the_export_is_and_how_to_load_it() -> None:
    card = model_card(CONFIG, ARCH, "nasloc_nsga2")
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "# nasloc_nsga2" in card and "searched by nasloc" in card
    for row in ("| search trial | 36 |", "| search space | cifar |", "| params | 0.366 M |",
                "| validation top-1 | 82.26 % on 5000 images |", "| trained | 30 epochs at 32 px, seed 0 |",
                "| recipe | lr 0.004, batch size 128, mixup off, randaugment off |",
                "| locality | mixers 1G 1W, FFN conv 1, 2 tokens, patch stem |",
                "| 1 | 24 | 3 | 2 | W G | - - | - 3 |"):
        assert row in card, row
    assert 'timm.create_model("local-dir:nasloc_nsga2", pretrained=True)' in card
    assert "mean [0.5, 0.5, 0.5]" in card and "(arch.svg)" in card


def test_a_card_leaves_out_the_facts_it_does_not_have() -> None:
    card = model_card({"nasloc": {"macs": 1e6, "params": 1e4}}, ARCH, "m")
    assert "a nasloc arch" in card and "search trial" not in card and "validation top-1" not in card
