"""How an arch is shown to a person: the locality line, the stage table and the SVG picture."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from nasloc.arch import Arch, Block, Shortcut, Stage
from nasloc.arch_view import arch_svg, locality, stage_table

SVG = "{http://www.w3.org/2000/svg}"
ARCH = Arch(
    stages=(
        Stage(24, 3, 2.0, (Block(mixer="dilated", dilations=(1, 2, 1), life=True, ffn_kernel=3), Block(mixer="window"))),
        Stage(64, 4, 3, (Block(), Block(ffn_kernel=5))),
    ),
    img_size=32, num_classes=5, patch_size=4, pos_embed="none", cls_token=False, head="avg", cpe=True,
    global_tokens=2, window=4, ffn="bidim", shortcuts=(Shortcut(0, 2, (3, 5)), Shortcut(3, 1, (7,))),
)


def test_the_locality_line_counts_each_mechanism_and_leaves_out_the_absent_ones() -> None:
    assert locality(ARCH) == ("mixers 2G 1D 1W, LIFE 1, FFN conv 2, 2 shortcuts, 2 tokens, bidim, CPE, "
                              "patch stem")
    plain = Arch(stages=(Stage(24, 3, 2.0, (Block(), Block())),), img_size=32, num_classes=5)
    assert locality(plain) == "mixers 2G, patch stem"


def test_the_stage_table_has_a_row_per_stage_with_a_mark_per_block() -> None:
    rows = stage_table(ARCH)
    assert rows[2] == "| 1 | 24 | 3 | 2 | D12 W | L - | 3 - |"
    assert rows[3] == "| 2 | 64 | 4 | 3 | G G | - - | - 5 |"
    assert rows[-1] == "Shortcuts: 0-1 k3/5, 3-3 k7. Skeleton: patch stem, 2 tokens, bidim FFN, CPE, 32 px."


def test_the_picture_is_valid_svg_with_a_box_per_block_and_an_arc_per_shortcut() -> None:
    root = ET.fromstring(arch_svg(ARCH, "a <title> & more"))
    assert root.tag == f"{SVG}svg"
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert texts[0] == "a <title> & more"  # escaped in the document, read back whole
    assert [t for t in texts if t in ("D12", "W", "G")] == ["D12", "W", "G", "G"]
    assert sum(t in ("k3/5", "k7") for t in texts) == 2 and len(list(root.iter(f"{SVG}path"))) == 2
    assert {"stage 124 ch, 3 heads, mlp 2", "stage 264 ch, 4 heads, mlp 3"} <= set(texts)
    stage_captions = [float(t.get("x")) for t in root.iter(f"{SVG}text") if "".join(t.itertext()).startswith("stage")]
    assert stage_captions[1] - stage_captions[0] >= 120  # captions of short stages do not overlap
