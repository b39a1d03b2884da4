"""Four-panel analogy composites: [A A'; B ?] grids and the geometry to cut them apart again.

Images follow ComfyUI's IMAGE convention: float tensors [batch, height, width, channels] in 0..1.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Layout = Literal["lorweb", "edit_transfer"]
Fit = Literal["center_crop", "pad", "stretch"]

LAYOUTS: tuple[str, ...] = ("lorweb", "edit_transfer")
FITS: tuple[str, ...] = ("center_crop", "pad", "stretch")
SNAPS: tuple[str, ...] = ("none", "multiple_of_8", "multiple_of_16", "multiple_of_64", "kontext")
PANELS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
ROLES: tuple[str, ...] = ("a", "a_prime", "b")  # the images that fill top-left, top-right, bottom-left

# FLUX.1-Kontext's preferred (width, height) training resolutions, published by Black Forest Labs.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)


MAX_COMPOSITE_BYTES = 4 * 2**30
"""Largest estimated working memory of one composite (all batch items); above it the composite is refused instead of
exhausting the machine's memory. A 4096x4096 panel (an 8192x8192 grid) needs about 1.7 GB per batch item."""
BYTES_PER_PANEL_PIXEL = 100
"""Peak working memory per panel pixel per batch item (float32): grid 48 B, mask 16 B, one panel being fitted with
its resize temporaries about 36 B (measured peak RSS: see tests/test_hardening_nodes.py)."""


class CompositeError(ValueError):
    """Bad input to a composite operation; the message names the offending input."""


@dataclass(frozen=True)
class ContentBox:
    """Where one source image ended up inside its panel.

    ``source_*`` is the region of the original image that is visible (the whole image unless centre-cropped);
    ``panel_*`` is where that region sits inside the panel (the whole panel unless padded).
    """

    source_width: int
    source_height: int
    source_x: int
    source_y: int
    source_w: int
    source_h: int
    panel_x: int
    panel_y: int
    panel_w: int
    panel_h: int


@dataclass(frozen=True)
class PanelGeometry:
    """Layout of a 2x2 composite: panel size, layout name and where each input's content sits."""

    panel_width: int
    panel_height: int
    layout: str
    fit: str
    boxes: dict[str, ContentBox] = field(default_factory=dict)

    @property
    def grid_width(self) -> int:
        return 2 * self.panel_width

    @property
    def grid_height(self) -> int:
        return 2 * self.panel_height

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Validation


def check_image(image: torch.Tensor, name: str) -> torch.Tensor:
    """Validate an IMAGE tensor and return it as float32 RGB ([B, H, W, 3]) in 0..1 (see :func:`sanitise`)."""
    return sanitise(check_image_shape(image, name), name)


def check_image_shape(image: torch.Tensor, name: str) -> torch.Tensor:
    """Validate an IMAGE tensor's type and shape (no pixel is read); RGBA is cut to RGB."""
    if not isinstance(image, torch.Tensor):
        raise CompositeError(f"{name}: expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim != 4:
        raise CompositeError(f"{name}: expected an IMAGE of shape [batch, height, width, channels], got {tuple(image.shape)}")
    batch, height, width, channels = image.shape
    if batch == 0:
        raise CompositeError(f"{name}: the image batch is empty (0 images)")
    if height == 0 or width == 0:
        raise CompositeError(f"{name}: zero-size image ({width}x{height} pixels)")
    if channels == 4:  # RGBA from some loaders: the composite is RGB
        image = image[..., :3]
    elif channels != 3:
        raise CompositeError(f"{name}: expected 3 (RGB) or 4 (RGBA) channels, got {channels}")
    if image.is_complex():
        raise CompositeError(f"{name}: expected real pixel values, got {image.dtype}")
    return image


def sanitise(image: torch.Tensor, name: str) -> torch.Tensor:
    """float32 in 0..1: any dtype is accepted (fp16/bf16 from some nodes, integers); NaN pixels become 0, +Inf 1,
    -Inf 0 (with a warning), and every value is clamped to ComfyUI's IMAGE range. No copy when nothing changes."""
    image = image.float()
    low, high = torch.aminmax(image)
    if low >= 0 and high <= 1:  # False for NaN and Inf too
        return image
    finite = torch.isfinite(image)
    if not finite.all():
        log.warning("%s: %d NaN/Inf pixel values replaced (NaN -> 0, +Inf -> 1, -Inf -> 0)", name,
                    int((~finite).sum()))
        image = torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
    return image.clamp(0.0, 1.0)


def composite_bytes(batch: int, width: int, height: int) -> int:
    """Estimated peak working memory of a composite of ``batch`` items with width x height panels."""
    return batch * width * height * BYTES_PER_PANEL_PIXEL


def check_composite_size(batch: int, width: int, height: int, limit: int = MAX_COMPOSITE_BYTES) -> None:
    need = composite_bytes(batch, width, height)
    if need > limit:
        raise CompositeError(f"a {2 * width}x{2 * height} composite of {batch} image(s) would need about "
                             f"{need / 2**30:.1f} GB of memory, more than the {limit / 2**30:.0f} GB limit; use a "
                             "smaller panel size (panel_size custom, or smaller A) or fewer images per batch")


def broadcast_batches(images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Repeat batch-1 inputs to the common batch size; refuse two different sizes above 1."""
    sizes = {name: img.shape[0] for name, img in images.items()}
    larger = {n: s for n, s in sizes.items() if s > 1}
    if len(set(larger.values())) > 1:
        listing = ", ".join(f"{n} has {s}" for n, s in sizes.items())
        raise CompositeError(f"batch sizes must be 1 or all equal: {listing}")
    target = max(sizes.values())
    return {n: img.expand(target, *img.shape[1:]) if img.shape[0] != target else img for n, img in images.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Sizes


def snap_panel_size(width: int, height: int, snap: str) -> tuple[int, int]:
    """Snap a panel size so the 2x2 grid suits the target model."""
    if snap == "none":
        return width, height
    if snap.startswith("multiple_of_"):
        m = int(snap.rsplit("_", 1)[1])
        return max(m, round(width / m) * m), max(m, round(height / m) * m)
    if snap == "kontext":
        grid_w, grid_h = kontext_resolution(2 * width, 2 * height)
        return grid_w // 2, grid_h // 2
    raise CompositeError(f"snap: expected one of {SNAPS}, got {snap!r}")


def kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution whose aspect ratio is closest to width/height."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return w, h


def resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Antialiased bicubic resize of [B, H, W, C]; a no-op (same tensor) when the size already matches."""
    if image.shape[1] == height and image.shape[2] == width:
        return image
    chw = image.movedim(-1, 1)
    out = F.interpolate(chw, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.movedim(1, -1).clamp(0.0, 1.0)


def fit_into_panel(image: torch.Tensor, width: int, height: int, fit: str, fill: float) -> tuple[torch.Tensor, ContentBox]:
    """Resize one image into a width x height panel, keeping aspect by centre-crop or padding (or stretching)."""
    src_h, src_w = image.shape[1], image.shape[2]
    if fit == "stretch":
        box = ContentBox(src_w, src_h, 0, 0, src_w, src_h, 0, 0, width, height)
        return resize(image, width, height), box
    if fit == "center_crop":
        # Crop the source to the panel's aspect first, then resize: the crop box is exact in source pixels.
        if src_w * height > width * src_h:
            crop_w, crop_h = max(1, round(src_h * width / height)), src_h
        else:
            crop_w, crop_h = src_w, max(1, round(src_w * height / width))
        x0, y0 = (src_w - crop_w) // 2, (src_h - crop_h) // 2
        cropped = image[:, y0 : y0 + crop_h, x0 : x0 + crop_w]
        box = ContentBox(src_w, src_h, x0, y0, crop_w, crop_h, 0, 0, width, height)
        return resize(cropped, width, height), box
    if fit == "pad":
        scale = min(width / src_w, height / src_h)
        new_w = min(width, max(1, round(src_w * scale)))
        new_h = min(height, max(1, round(src_h * scale)))
        x0, y0 = (width - new_w) // 2, (height - new_h) // 2
        panel = image.new_full((image.shape[0], height, width, image.shape[3]), float(fill))
        panel[:, y0 : y0 + new_h, x0 : x0 + new_w] = resize(image, new_w, new_h)
        box = ContentBox(src_w, src_h, 0, 0, src_w, src_h, x0, y0, new_w, new_h)
        return panel, box
    raise CompositeError(f"fit: expected one of {FITS}, got {fit!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Compose and extract


def four_panel_composite(
    a: torch.Tensor,
    a_prime: torch.Tensor,
    b: torch.Tensor,
    layout: str = "lorweb",
    panel_size: tuple[int, int] | None = None,
    fit: str = "center_crop",
    snap: str = "none",
    fill: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, PanelGeometry]:
    """Build the [A A'; B ?] grid.

    ``layout="lorweb"`` puts a copy of B bottom-right (LoRWeB's Kontext reference); ``"edit_transfer"`` fills it with
    the neutral grey ``fill`` (the panel Edit Transfer inpaints). ``panel_size`` is (width, height) and defaults to
    A's size. Returns (composite [B, 2H, 2W, 3], bottom-right mask [B, 2H, 2W], geometry).
    """
    if layout not in LAYOUTS:
        raise CompositeError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if not 0.0 <= fill <= 1.0:
        raise CompositeError(f"fill: expected a grey level in 0..1, got {fill}")
    images = {"a": a, "a_prime": a_prime, "b": b}
    images = {role: check_image_shape(image, role) for role, image in images.items()}
    batch = broadcast_batches(images)["a"].shape[0]  # checks the sizes; batch-1 panels broadcast when written

    if panel_size is None:
        panel_size = (images["a"].shape[2], images["a"].shape[1])
    width, height = panel_size
    if width <= 0 or height <= 0:
        raise CompositeError(f"panel size: width and height must be positive, got {width}x{height}")
    width, height = snap_panel_size(width, height, snap)
    check_composite_size(batch, width, height)  # before any pixel is touched
    device = images["a"].device
    images = {role: sanitise(image, role).to(device) for role, image in images.items()}

    # one grid written panel by panel (no concatenated copies): the peak is the grid plus one panel being fitted
    composite = torch.empty((batch, 2 * height, 2 * width, 3), dtype=torch.float32, device=device)
    corners = {"a": (0, 0), "a_prime": (0, width), "b": (height, 0)}
    boxes = {}
    for role, image in images.items():
        panel, boxes[role] = fit_into_panel(image, width, height, fit, fill)
        y, x = corners[role]
        composite[:, y: y + height, x: x + width] = panel
        del panel
    if layout == "lorweb":
        composite[:, height:, width:] = composite[:, height:, :width]
    else:
        composite[:, height:, width:] = float(fill)

    mask = torch.zeros(composite.shape[:3], dtype=composite.dtype, device=composite.device)
    mask[:, height:, width:] = 1.0
    geometry = PanelGeometry(width, height, layout, fit, boxes)
    return composite, mask, geometry


def panel_bounds(image_width: int, image_height: int, panel: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a quadrant of a composite, or of an image of the composite's aspect generated from it at
    any size: the grid is always two panels wide and tall, so the split is the middle, floored on an odd side as
    everywhere else in the pack (Edit Transfer's panel-wise encoding and mask)."""
    if panel not in PANELS:
        raise CompositeError(f"panel: expected one of {PANELS}, got {panel!r}")
    split_x, split_y = image_width // 2, image_height // 2
    x0, x1 = (0, split_x) if panel.endswith("left") else (split_x, image_width)
    y0, y1 = (0, split_y) if panel.startswith("top") else (split_y, image_height)
    return x0, y0, x1, y1


def extract_panel(
    image: torch.Tensor,
    panel: str = "bottom_right",
    geometry: PanelGeometry | None = None,
    restore_size: bool = False,
) -> torch.Tensor:
    """Cut one quadrant out of a composite (or of a generated image of the composite's aspect).

    With ``restore_size`` and a geometry, padding is removed and the panel is resized back to the pixel size of the
    visible part of B, so B' lines up with B.
    """
    image = check_image(image, "image")
    img_h, img_w = image.shape[1], image.shape[2]
    if img_w < 2 or img_h < 2:
        raise CompositeError(f"image: {img_w}x{img_h} is too small to hold four panels")
    x0, y0, x1, y1 = panel_bounds(img_w, img_h, panel)
    out = image[:, y0:y1, x0:x1]
    if not restore_size:
        return out
    if geometry is None:
        raise CompositeError("restore_size needs the geometry output of Four-Panel Composite")
    box = geometry.boxes.get("b")
    if box is None:
        raise CompositeError("geometry has no record of B's placement")
    x0, x1 = _scaled_span(box.panel_x, box.panel_w, geometry.panel_width, out.shape[2])
    y0, y1 = _scaled_span(box.panel_y, box.panel_h, geometry.panel_height, out.shape[1])
    return resize(out[:, y0:y1, x0:x1], box.source_w, box.source_h)


def _scaled_span(start: int, length: int, panel: int, actual: int) -> tuple[int, int]:
    """[start, start + length) of a ``panel``-pixel axis mapped onto ``actual`` pixels, at least one pixel wide (a
    thin letterboxed B in a smaller decode would otherwise round to nothing)."""
    scale = actual / panel
    lo = min(actual - 1, max(0, round(start * scale)))
    hi = min(actual, max(lo + 1, round((start + length) * scale)))
    return lo, hi
