"""`mergelab export`: one task of a model folder (a fine-tune or a merge with its heads) as a
standard transformers sequence-classification folder. See `mergelab.export.classifier`."""

from mergelab.export.classifier import export_classifier

__all__ = ["export_classifier"]
