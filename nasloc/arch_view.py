"""An arch as a reader sees it: a short locality summary, a per-stage table with its legend, and a picture (SVG).

The picture draws the stages left to right, one box per block coloured by its token mixer (global attention,
dilated attention with its heads' rates, window attention with global tokens), LIFE and the FFN's depth-wise
conv as marks on the block, the depth-wise conv shortcuts as arcs over the blocks they span with their kernels,
and the global tokens as a row of dots over the stages whose blocks use them.
"""
from __future__ import annotations

from html import escape

from .arch import Arch, Block

MIXER_LETTER = {"global": "G", "dilated": "D", "window": "W"}
MIXER_COLOUR = {"global": "#9db4d3", "dilated": "#f2a65a", "window": "#7cc48a"}
LEGEND = ("token mixer per block: G global attention, D dilated attention with its heads' rates (D123: rates 1, 2 "
          "and 3; DilateFormer), W window attention with global tokens (LightViT); LIFE: L where the block has LIFE's "
          "multi-scale qkv; FFN conv: the kernel of the depth-wise conv in the block's FFN (LocalViT), - none; "
          "shortcuts: a depth-wise conv shortcut from the input of block i to the output of block j with its kernels "
          "(Efficient ViT with DW), blocks counted over the network from 0; tokens: LightViT's global tokens; "
          "bidim: LightViT's bi-dimensional FFN gate; CPE: conditional position encoding")


def block_label(block: Block) -> str:
    if block.mixer == "dilated":
        return "D" + "".join(str(r) for r in sorted(set(block.dilations or (1,))))
    return MIXER_LETTER[block.mixer]


def locality(arch: Arch) -> str:
    """One short line: how many blocks take each mechanism, and the skeleton's locality (zeros left out)."""
    blocks = [b for _, _, _, b in arch.iter_blocks()]
    mixers = " ".join(f"{sum(b.mixer == m for b in blocks)}{letter}" for m, letter in MIXER_LETTER.items()
                      if any(b.mixer == m for b in blocks))
    parts = [f"mixers {mixers}",
             f"LIFE {sum(b.life for b in blocks)}" if any(b.life for b in blocks) else "",
             f"FFN conv {sum(bool(b.ffn_kernel) for b in blocks)}" if any(b.ffn_kernel for b in blocks) else "",
             f"{len(arch.shortcuts)} shortcuts" if arch.shortcuts else "",
             f"{arch.global_tokens} tokens" if arch.global_tokens else "",
             "bidim" if arch.ffn == "bidim" else "", "CPE" if arch.cpe else "", f"{arch.stem} stem"]
    return ", ".join(p for p in parts if p)


def stage_table(arch: Arch) -> list[str]:
    """Markdown: one row per stage (width, heads, MLP ratio, and per block its mixer, LIFE and FFN conv), then the
    shortcuts and the skeleton; :data:`LEGEND` explains the letters."""
    rows = ["| stage | dim | heads | mlp | token mixers | LIFE | FFN conv |", "|---|---|---|---|---|---|---|"]
    for s, stage in enumerate(arch.stages):
        rows.append(f"| {s + 1} | {stage.dim} | {stage.heads} | {stage.mlp_ratio:g} | "
                    f"{' '.join(block_label(b) for b in stage.blocks)} | "
                    f"{' '.join('L' if b.life else '-' for b in stage.blocks)} | "
                    f"{' '.join(str(b.ffn_kernel) if b.ffn_kernel else '-' for b in stage.blocks)} |")
    shortcuts = ", ".join(f"{s.start}-{s.start + s.span - 1} k{'/'.join(map(str, s.kernels))}" for s in arch.shortcuts)
    skeleton = [f"{arch.stem} stem", f"{arch.global_tokens} tokens" if arch.global_tokens else "",
                f"{arch.ffn} FFN", "CPE" if arch.cpe else "", f"{arch.img_size} px"]
    return rows + ["", f"Shortcuts: {shortcuts or 'none'}. Skeleton: {', '.join(p for p in skeleton if p)}."]


def arch_svg(arch: Arch, title: str = "") -> str:
    """The picture of ``arch`` described in the module, as a standalone SVG document."""
    box, gap, stage_gap, left, top = 46, 8, 34, 96, 92
    min_stage = 120  # room for the stage's two caption lines under a one-block stage
    positions, x = [], left
    for stage in arch.stages:
        blocks = len(stage.blocks) * (box + gap) - gap
        x += max(0, (min_stage - blocks) / 2)
        positions.append([x + b * (box + gap) for b in range(len(stage.blocks))])
        x += blocks + max(0, (min_stage - blocks) / 2) + stage_gap
    width, height = max(x + 40, 640), top + box + 110
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="12" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<rect x="12" y="{top}" width="{left - 28}" height="{box}" rx="6" fill="#e8e8e8" stroke="#666"/>',
           f'<text x="{12 + (left - 28) / 2}" y="{top + box / 2 + 4}" text-anchor="middle">{escape(arch.stem)}</text>']
    flat = [(s, b, block, positions[s][b]) for _, s, b, block in arch.iter_blocks()]
    for s, stage in enumerate(arch.stages):
        x0 = positions[s][0]
        x1 = positions[s][-1] + box
        out.append(f'<text x="{(x0 + x1) / 2}" y="{top + box + 38}" text-anchor="middle" fill="#333">'
                   f'<tspan font-weight="bold">stage {s + 1}</tspan><tspan x="{(x0 + x1) / 2}" dy="15">'
                   f'{stage.dim} ch, {stage.heads} heads, mlp {stage.mlp_ratio:g}</tspan></text>')
        if arch.global_tokens and any(b.mixer == "window" for b in stage.blocks):
            dots = min(arch.global_tokens, 8)
            for i in range(dots):
                cx = (x0 + x1) / 2 + (i - (dots - 1) / 2) * 9
                out.append(f'<circle cx="{cx}" cy="{top - 8}" r="3" fill="#2f7d3e"/>')
    for s, b, block, bx in flat:
        out.append(f'<rect x="{bx}" y="{top}" width="{box}" height="{box}" rx="5" fill="{MIXER_COLOUR[block.mixer]}" '
                   f'stroke="#444"/>')
        out.append(f'<text x="{bx + box / 2}" y="{top + box / 2 + 4}" text-anchor="middle" '
                   f'font-weight="bold">{block_label(block)}</text>')
        if block.life:
            out.append(f'<circle cx="{bx + box - 8}" cy="{top + 8}" r="6" fill="#7b4fa0"/>'
                       f'<text x="{bx + box - 8}" y="{top + 12}" text-anchor="middle" font-size="9" '
                       f'fill="white">L</text>')
        if block.ffn_kernel:
            out.append(f'<text x="{bx + box / 2}" y="{top + box + 16}" text-anchor="middle" font-size="11" '
                       f'fill="#8a3b12">k{block.ffn_kernel}</text>')
    for shortcut in arch.shortcuts:
        x0 = flat[shortcut.start][3] + box / 2
        x1 = flat[shortcut.start + shortcut.span - 1][3] + box / 2 + (box / 2 - 4 if shortcut.span == 1 else 0)
        x0 -= box / 2 - 4 if shortcut.span == 1 else 0
        rise = 18 + 10 * shortcut.span
        out.append(f'<path d="M {x0} {top} C {x0} {top - rise}, {x1} {top - rise}, {x1} {top}" fill="none" '
                   f'stroke="#1f5fa8" stroke-width="1.5"/>')
        out.append(f'<text x="{(x0 + x1) / 2}" y="{top - rise * 0.75 - 2}" text-anchor="middle" font-size="10" '
                   f'fill="#1f5fa8">k{"/".join(map(str, shortcut.kernels))}</text>')
    legend = [("global attention", MIXER_COLOUR["global"]), ("dilated (rates)", MIXER_COLOUR["dilated"]),
              ("window + global tokens", MIXER_COLOUR["window"])]
    lx = 12
    for label, colour in legend:
        out.append(f'<rect x="{lx}" y="{height - 40}" width="12" height="12" fill="{colour}" stroke="#444"/>'
                   f'<text x="{lx + 16}" y="{height - 30}">{label}</text>')
        lx += 22 + 7 * len(label)
    out.append(f'<text x="12" y="{height - 10}" fill="#555">L: LIFE, kN under a block: FFN conv, arcs: DW '
               f'shortcuts, dots: {arch.global_tokens} global tokens</text>')
    out.append("</svg>")
    return "\n".join(out)
