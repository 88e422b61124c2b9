"""Per-task modulators over merged weights (TALL masks, EMR): their folder format, the writer
the merge uses, and applying one task's modulators (evaluation, `mergelab modulators export`).

See `mergelab.modulators.format` for the layout of an output folder.
"""

from mergelab.modulators.apply import ModulatedFolder, export_task, has_modulators
from mergelab.modulators.format import pack_mask, unpack_mask

__all__ = ["ModulatedFolder", "export_task", "has_modulators", "pack_mask", "unpack_mask"]
