"""Four-Panel Composite and Extract Panel: the [A A'; B ?] grid that in-context analogy models read and write."""

from __future__ import annotations

from ..analogy_core import composite as core
from .common import CATEGORY, GEOMETRY_TYPE

MAX_PANEL = 4096  # an 8192x8192 grid, ~1.7 GB per batch item; larger batches stop at core.MAX_COMPOSITE_BYTES


class FourPanelComposite:
    DESCRIPTION = (
        "Arranges A (top-left), A' (top-right) and B (bottom-left) into one 2x2 image. Bottom-right is a copy of B "
        "(LoRWeB's Kontext reference) or a blank panel to inpaint (Edit Transfer). Also outputs the bottom-right mask "
        "and the geometry that Extract Panel needs to cut B' back out. Pixels are clamped to 0..1 (NaN/Inf "
        "replaced); a composite that would need more than 4 GB of memory is refused."
    )
    CATEGORY = f"{CATEGORY}/composite"
    FUNCTION = "compose"
    RETURN_TYPES = ("IMAGE", "MASK", GEOMETRY_TYPE)
    RETURN_NAMES = ("composite", "mask", "geometry")
    OUTPUT_TOOLTIPS = (
        "The 2x2 composite [A A'; B ?] (batch = the largest input batch).",
        "1 inside the bottom-right panel, 0 elsewhere: the region where B' is generated.",
        "Panel size and placement of each input, for Extract Panel.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "a": ("IMAGE", {"tooltip": "A: the example before the change (top-left)."}),
                "a_prime": ("IMAGE", {"tooltip": "A': the example after the change (top-right)."}),
                "b": ("IMAGE", {"tooltip": "B: the image to change the same way (bottom-left)."}),
                "layout": (list(core.LAYOUTS), {
                    "default": "lorweb",
                    "tooltip": "lorweb: bottom-right is a copy of B (FLUX.1-Kontext reference grid). "
                    "edit_transfer: bottom-right is a blank panel of the fill grey, to be inpainted.",
                }),
                "panel_size": (["match_a", "custom"], {
                    "default": "match_a",
                    "tooltip": "match_a: every panel takes A's size. custom: every panel is width x height.",
                }),
                "width": ("INT", {"default": 512, "min": 8, "max": MAX_PANEL, "step": 8,
                                  "tooltip": "Panel width in pixels (used when panel_size is custom)."}),
                "height": ("INT", {"default": 512, "min": 8, "max": MAX_PANEL, "step": 8,
                                   "tooltip": "Panel height in pixels (used when panel_size is custom)."}),
                "fit": (list(core.FITS), {
                    "default": "center_crop",
                    "tooltip": "How an image of another aspect ratio fills its panel: center_crop keeps the middle, "
                    "pad letterboxes with the fill grey, stretch distorts.",
                }),
                "snap": (list(core.SNAPS), {
                    "default": "none",
                    "tooltip": "Round the panel size: multiple_of_N for latent/patch alignment (16 suits FLUX), "
                    "kontext makes the grid the FLUX.1-Kontext preferred resolution closest to its aspect "
                    "(a 1024x1024 grid of 512x512 panels for square ones).",
                }),
                "fill": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Grey level (0 black, 1 white) for padding and the blank edit_transfer panel."}),
            }
        }

    def compose(self, a, a_prime, b, layout, panel_size, width, height, fit, snap, fill):
        size = (width, height) if panel_size == "custom" else None
        composite, mask, geometry = core.four_panel_composite(
            a, a_prime, b, layout=layout, panel_size=size, fit=fit, snap=snap, fill=fill
        )
        return (composite, mask, geometry)


class ExtractPanel:
    DESCRIPTION = (
        "Cuts one quadrant out of a four-panel image, typically B' (bottom-right) from the sampled composite. "
        "Works on a resized image too: the panel borders scale with it."
    )
    CATEGORY = f"{CATEGORY}/composite"
    FUNCTION = "extract"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("panel",)
    OUTPUT_TOOLTIPS = ("The chosen quadrant.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "A four-panel image (the composite or the decoded result)."}),
                "panel": (list(core.PANELS), {"default": "bottom_right",
                                              "tooltip": "Which quadrant to cut out; bottom_right holds B'."}),
                "restore_size": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Remove padding and resize back to the pixel size of B's visible region "
                    "(needs geometry).",
                }),
            },
            "optional": {
                "geometry": (GEOMETRY_TYPE, {"tooltip": "Geometry from Four-Panel Composite. Without it the image "
                                                        "is split at its middle."}),
            },
        }

    def extract(self, image, panel, restore_size, geometry=None):
        return (core.extract_panel(image, panel=panel, geometry=geometry, restore_size=restore_size),)


NODE_CLASS_MAPPINGS = {
    "AnalogyFourPanelComposite": FourPanelComposite,
    "AnalogyExtractPanel": ExtractPanel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AnalogyFourPanelComposite": "Four-Panel Composite",
    "AnalogyExtractPanel": "Extract Panel",
}
