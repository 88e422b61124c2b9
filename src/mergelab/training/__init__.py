"""The one fine-tuning layer: settings, the loop, the LP-FT and joint recipes, probes, folders.

    settings = FinetuneSettings(recipe="lpft", steps=100, learning_rate=5e-5, seed=0)
    examples = TextExamples(tokenizer, texts, labels, max_length=64)   # or TensorExamples(x, y)
    result = finetune_classifier(encoder, examples, num_classes, settings)
    result.encoder, result.head, result.losses

`train` is the loop itself (any `Examples` with a `loss`, any head or none); `finetune_to_folder`
is `mergelab finetune`. See each module's docstring.
"""

from mergelab.training.cache import DONE_MARKER, cache_key, cached_folder, folder_fingerprint
from mergelab.training.examples import (
    ClassificationExamples,
    Examples,
    TensorExamples,
    TextExamples,
    classification_loss,
)
from mergelab.training.folder import (
    HEAD_FILE,
    RECIPE_FILE,
    load_head,
    read_recipe,
    save_finetuned,
    save_finetuned_module,
    save_head,
)
from mergelab.training.loop import TrainingError, train
from mergelab.training.probe import fit_linear_probe, fit_probe, fit_softmax_probe
from mergelab.training.recipes import Finetuned, finetune_classifier, random_head
from mergelab.training.settings import RECIPES, FinetuneSettings
from mergelab.training.to_folder import finetune_to_folder

__all__ = [
    "DONE_MARKER", "HEAD_FILE", "RECIPES", "RECIPE_FILE", "ClassificationExamples", "Examples",
    "FinetuneSettings", "Finetuned", "TensorExamples", "TextExamples", "TrainingError",
    "cache_key", "cached_folder", "classification_loss", "finetune_classifier", "finetune_to_folder",
    "fit_linear_probe", "fit_probe", "fit_softmax_probe", "folder_fingerprint", "load_head",
    "random_head", "read_recipe", "save_finetuned", "save_finetuned_module", "save_head",
    "train",
]  # fmt: skip
