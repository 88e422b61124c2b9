"""The LoRA benchmarks' own arithmetic (benchmarks/lora_roundtrip.py), checked by hand and on a
tiny model: the 99% rank rule, the pooled reconstruction error, and the error recomputed from
any writer's adapter (as the mergekit comparison does)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from _lora_models import save_model, tiny_llama  # noqa: E402
from conftest import save_checkpoint  # noqa: E402
from lora_roundtrip import (  # noqa: E402
    Setting,
    delta_norms,
    reconstruction,
    settings_of,
    smallest_rank_keeping,
    weighted_relative_error,
)

from mergelab.lora.ops import extract_adapter  # noqa: E402


def test_smallest_rank_keeping_99_percent_of_the_finetune():
    # 0.99 x 0.90 = 0.891: rank 8 (0.889) falls short, rank 16 (0.892) reaches it.
    accuracy = {32: 0.90, 4: 0.80, 16: 0.892, 8: 0.889}
    assert smallest_rank_keeping(accuracy, 0.90) == 16
    # The smallest rank that reaches it, even if a larger one dips below again.
    assert smallest_rank_keeping({4: 0.95, 8: 0.85, 16: 0.97}, 0.95) == 4
    assert smallest_rank_keeping({4: 0.5, 8: 0.6}, 0.9) is None


def test_pooled_relative_error_weights_modules_by_their_norms():
    # sqrt((0.5 * 3)^2 / (3^2 + 4^2)) = 1.5 / 5 = 0.3; a module not extracted does not count.
    assert weighted_relative_error({"a": 0.5, "b": 0.0}, {"a": 3.0, "b": 4.0, "c": 100.0}) == pytest.approx(0.3)
    assert weighted_relative_error({"a": 0.0}, {"a": 0.0}) == 0.0


def test_settings_and_labels():
    settings = settings_of([4, 128], [0.9])
    assert [s.label for s in settings] == ["rank 4", "rank 128", "energy 0.9"]
    assert Setting(rank=64, energy=0.99).label == "energy 0.99 (cap 64)"
    assert Setting(rank=64, energy=0.99).slug == "energy-0.99-cap-64"


def test_reconstruction_recomputed_from_the_adapter_matches_the_spectrum(tmp_path):
    model = tiny_llama()
    base = save_model(model, tmp_path / "base")
    base_sd = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    tuned_sd = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base_sd.items()}
    tuned = save_checkpoint(tmp_path / "tuned", tuned_sd,
                            config=model.config.to_dict())
    report = extract_adapter(base, tuned, tmp_path / "adapter", rank=3, progress=False)
    norms = delta_norms(base_sd, tuned_sd)
    measured = reconstruction(base, tuned, tmp_path / "adapter")
    # By hand: per module, the energy of the singular values past rank 3 (Eckart-Young).
    tail = total = 0.0
    for module in report.modules:
        delta = (tuned_sd[module + ".weight"] - base_sd[module + ".weight"]).double()
        values = torch.linalg.svdvals(delta).square()
        tail += float(values[3:].sum())
        total += float(values.sum())
    assert measured["relative_error"] == pytest.approx(math.sqrt(tail / total), rel=1e-4)
    errors = {m: float(e["relative_error"]) for m, e in report.modules.items()}
    assert weighted_relative_error(errors, norms) == pytest.approx(measured["relative_error"], rel=1e-4)
    # lm_head is a LoRA module; embed_tokens and the norms are saved whole.
    assert measured["modules"] == len(report.modules) == 2 * 7 + 1
    assert measured["saved_tensors"] == len(report.saved) == 2 * 2 + 2
