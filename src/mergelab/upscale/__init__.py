"""Upscaled merges (SMILE, WEMoE): the shared weights plus extra tensors per tensor, their
folder format, the writer the merge uses, loading the result as a torch module, and the data
stage that trains some extras (WEMoE's routers: `mergelab.upscale.train`).

See `mergelab.upscale.format` for the layout of an output folder.
"""

from mergelab.upscale.load import has_upscaling, upscale_module

__all__ = ["has_upscaling", "upscale_module"]
