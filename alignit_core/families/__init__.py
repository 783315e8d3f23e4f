"""One object per model family: everything that differs between Stable Diffusion 1.x/2.x/SDXL
and other denoisers, behind one set of questions the engine asks (see ARCHITECTURE.md).

To add a family: a module here with a class that answers what `UNetFamily` answers (its
docstrings are the contract), and a line in `FAMILIES`; `family_for` picks the first that accepts
a loaded diffusers pipeline.
"""
from __future__ import annotations

from ..errors import ModelError
from .mmdit_family import EMBEDDED_MMDIT_DEFAULTS, MMDiTFamily
from .sd_unet import EMBEDDED_DEFAULTS, Defaults, UNetFamily

FAMILIES = (UNetFamily, MMDiTFamily)


def family_for(pipe, device, defaults: Defaults | None = None):
    """The family object serving `pipe` (its parts moved to `device`); `defaults` None: the family's
    own. Raises ModelError when no family knows the pipeline."""
    for family in FAMILIES:
        if family.accepts(pipe):
            return family(pipe, device, defaults)
    raise ModelError(f"{type(pipe).__name__} is not a pipeline this engine knows (Stable Diffusion 1.x, 2.x "
                     f"or SDXL: a UNet and a CLIP text encoder; SD3 or Flux: an MMDiT transformer)")


__all__ = ["EMBEDDED_DEFAULTS", "EMBEDDED_MMDIT_DEFAULTS", "FAMILIES", "Defaults", "MMDiTFamily", "UNetFamily",
           "family_for"]
