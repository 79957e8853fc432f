"""``nasloc presets``: the registered presets with their papers, params and MACs."""
from __future__ import annotations

from ..models.presets import PAPERS, PRESETS
from ..space.flops import count
from .shared import print_table


# ===================================================================================== presets
def presets_command() -> list[tuple[str, ...]]:
    """Print the registered presets: seed paper, params, MACs at their resolution, input size."""
    rows = []
    for name, arch in PRESETS.items():
        cost = count(arch)
        rows.append((name, PAPERS[name], f"{cost.params / 1e6:.2f}", f"{cost.macs / 1e9:.2f}",
                     f"{arch.img_size} px", str(arch.num_classes)))
    headers = ("preset", "seed paper", "params (M)", "GMACs (multiply-adds)", "input", "classes")
    print(print_table(headers, rows))
    return rows
