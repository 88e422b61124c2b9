"""Upscaled merges (SMILE): the shared weights plus extra tensors per tensor, their folder
format, the writer the merge uses, and loading the result as a torch module.

See `mergelab.upscale.format` for the layout of an output folder.
"""

from mergelab.upscale.load import has_upscaling, upscale_module

__all__ = ["has_upscaling", "upscale_module"]
