"""Draw the pack's registry icon, ``docs/icon.png`` (``[tool.comfy] Icon`` points at it): the analogy in one picture,
a 2x2 grid where A -> A' (a blue disc turns red) is applied to B (a blue square) to give B' (a red square).

    .venv/bin/python -m devtools.make_icon
"""

from __future__ import annotations


from PIL import Image, ImageDraw

from .comfy_server import REPO_ROOT

ICON = REPO_ROOT / "docs" / "icon.png"
SIZE = 256  # the registry asks for a square icon of at most 400 x 400 px
BLUE, RED, PANEL, GRID = (52, 120, 230), (225, 60, 50), (238, 236, 230), (40, 40, 48)


def draw_icon(size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), GRID)
    draw = ImageDraw.Draw(image)
    gap, half = size // 32, size // 2
    for row in range(2):
        for column in range(2):
            left, top = column * half + gap, row * half + gap
            right, bottom = left + half - 2 * gap, top + half - 2 * gap
            draw.rounded_rectangle((left, top, right, bottom), radius=size // 20, fill=PANEL)
            inset = (right - left) // 4
            shape = (left + inset, top + inset, right - inset, bottom - inset)
            colour = RED if column == 1 else BLUE
            if row == 0:
                draw.ellipse(shape, fill=colour)
            else:
                draw.rectangle(shape, fill=colour)
    return image


def main() -> int:
    draw_icon().save(ICON, optimize=True)
    print(f"wrote {ICON} ({ICON.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
