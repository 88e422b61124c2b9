"""Kernels of the research-line methods: TSV-M, Iso-C, Iso-CTS, MagMax, ExPO, PCB-merging.

Hand-computed values on tiny tensors, properties from each paper's formula, and (for PCB) a
differential check against a step-by-step NumPy transcription of the official algorithm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from mergelab.errors import MergeError
from mergelab.methods import get_method
from mergelab.methods.iso import iso_c_matrix, iso_cts_matrix, split_rank
from mergelab.methods.magmax import max_magnitude
from mergelab.methods.pcb import pcb_merge
from mergelab.methods.registry import TensorMerge, resolve_defaults
from mergelab.methods.tsv import kept_rank, tsv_merge_matrix

MATRIX = "model.layers.0.mlp.down_proj.weight"
RESEARCH = ("tsv", "iso_c", "iso_cts", "magmax", "expo", "pcb")


def merge(
    method_name: str,
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    name: str = MATRIX,
    **params: float | bool,
) -> torch.Tensor:
    """Run a registered kernel the way the engine does: defaults filled, base held apart."""
    method = get_method(method_name)
    for key, value in params.items():
        declared = method.param(key)
        assert declared is not None, f"{method_name} has no parameter {key}"
        assert declared.check(value) is None
    return method.kernel(
        TensorMerge(
            tensors=tensors,
            base=base,
            model_params=[resolve_defaults(method.model_params, {}) for _ in tensors],
            params=resolve_defaults(method.global_params, params),
            generator=torch.Generator().manual_seed(0),
            name=name,
        )
    )


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize(
    ("name", "arxiv"),
    [
        ("tsv", "2412.00081"),
        ("iso_c", "2502.04959"),
        ("iso_cts", "2502.04959"),
        ("magmax", "2407.06322"),
        ("expo", "2404.16792"),
        ("pcb", "2410.02396"),
    ],
)
def test_declarations_cite_their_paper_and_need_a_base(name: str, arxiv: str) -> None:
    method = get_method(name)
    assert method.url == f"https://arxiv.org/abs/{arxiv}"
    assert method.title and method.paper
    assert method.base == "required"
    assert method.kernel.__module__.startswith("mergelab.methods.")


@pytest.mark.parametrize(
    ("name", "param", "bad"),
    [
        ("tsv", "rank_fraction", 1.5),
        ("tsv", "lambda", -1.0),
        ("iso_cts", "common_space_fraction", 1.2),
        ("iso_c", "alpha", -0.5),
        ("magmax", "lambda", -1.0),
        ("expo", "alpha", -0.1),
        ("pcb", "pcb_ratio", 1.1),
        ("pcb", "clip_ratio", 0.6),
        ("tsv", "svd_embeddings", 1),
    ],
)
def test_out_of_range_parameters_are_rejected_with_their_name(
    name: str, param: str, bad: float
) -> None:
    declared = get_method(name).param(param)
    assert declared is not None
    problem = declared.check(bad)
    assert problem is not None and f"`{param}`" in problem


def test_paper_defaults() -> None:
    def default(method: str, param: str) -> object:
        declared = get_method(method).param(param)
        assert declared is not None
        return declared.default

    assert default("tsv", "lambda") == 1.0
    assert default("tsv", "rank_fraction") == 0.0  # 0 = 1/num_models
    assert default("iso_cts", "common_space_fraction") == 0.8
    assert default("magmax", "lambda") == 0.5  # the official scripts' coefficient
    assert default("expo", "alpha") == 0.3
    assert default("pcb", "pcb_ratio") == 0.1
    assert default("pcb", "clip_ratio") == 1e-4
    assert get_method("expo").min_models == get_method("expo").max_models == 1


@pytest.mark.parametrize("name", RESEARCH)
def test_missing_base_is_a_merge_error_naming_the_tensor(name: str) -> None:
    method = get_method(name)
    m = TensorMerge(
        tensors=[torch.ones(2, 2)],
        base=None,
        model_params=[{}],
        params=resolve_defaults(method.global_params, {}),
        name="layer.weight",
    )
    with pytest.raises(MergeError, match="layer.weight"):
        method.kernel(m)


@pytest.mark.parametrize("name", RESEARCH)
def test_output_keeps_shape_and_float32(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=gen)
    count = 1 if name == "expo" else 3
    sources = [base + 0.1 * torch.randn(6, 4, generator=gen) for _ in range(count)]
    out = merge(name, base, sources)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- TSV-M


def test_kept_rank_matches_the_official_split() -> None:
    assert kept_rank(768, 8, 0.0) == 96
    assert kept_rank(98, 49, 0.0) == 2  # 98 * (1/49) floors to 1 in floating point
    assert kept_rank(3, 4, 0.0) == 1  # at least one triplet per task
    assert kept_rank(30, 2, 0.1) == 3
    assert kept_rank(10, 2, 1.0) == 10


def test_tsv_hand_computed_2x2() -> None:
    # Each task keeps its top triplet (rank 2 // 2 tasks = 1): 3 e1 e1^T and 2 e2 e2^T,
    # already orthogonal, so the merge is their sum; lambda 0.5 halves it.
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tau1 = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    tau2 = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    out = merge("tsv", base, [base + tau1, base + tau2], **{"lambda": 0.5})
    torch.testing.assert_close(out, base + 0.5 * torch.tensor([[3.0, 0.0], [0.0, 2.0]]))


def test_tsv_overlapping_tasks_are_orthogonalised_by_procrustes() -> None:
    # tau1 = 3 e1 e1^T, tau2 = 2 w w^T with w at 45 degrees: the kept singular vectors overlap,
    # so U_hat = V_hat = [e1, w] is replaced by its polar factor (computed here by SciPy's
    # polar decomposition, an independent algorithm).
    w = np.array([1.0, 1.0]) / math.sqrt(2.0)
    tau1 = 3.0 * np.outer([1.0, 0.0], [1.0, 0.0])
    tau2 = 2.0 * np.outer(w, w)
    stacked = np.column_stack([[1.0, 0.0], w])
    orth, _ = scipy.linalg.polar(stacked)
    expected = orth @ np.diag([3.0, 2.0]) @ orth.T
    out = tsv_merge_matrix(torch.tensor(np.stack([tau1, tau2])))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)
    # Overlap is reduced, not summed: the result differs from task arithmetic.
    assert not np.allclose(expected, tau1 + tau2)


def test_tsv_of_mutually_orthogonal_low_rank_tasks_is_their_scaled_sum() -> None:
    gen = torch.Generator().manual_seed(2)
    left, right = random_orthogonal(6, gen), random_orthogonal(6, gen)
    base = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    taus = [
        left[:, 2 * i : 2 * i + 2]
        @ torch.diag(torch.rand(2, generator=gen, dtype=torch.float64) + 0.5)
        @ right[:, 2 * i : 2 * i + 2].T
        for i in range(3)
    ]  # rank 2 each = 6 // 3: truncation keeps them whole
    out = merge("tsv", base, [base + t for t in taus], **{"lambda": 0.7})
    torch.testing.assert_close(out, base + 0.7 * sum(taus))


def test_tsv_single_model_at_lambda_one_returns_it() -> None:
    gen = torch.Generator().manual_seed(3)
    base, model = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    torch.testing.assert_close(merge("tsv", base, [model]), model, atol=1e-5, rtol=1e-5)


def test_tsv_non_matrix_and_vocabulary_tables_take_the_mean() -> None:
    base = torch.zeros(3)
    out = merge(
        "tsv",
        base,
        [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, 1.0])],
        name="model.norm.weight",
    )
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0, 2.0]))

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(8, 3, generator=gen)
    sources = [base + torch.randn(8, 3, generator=gen) for _ in range(2)]
    mean = base + (sources[0] - base + sources[1] - base) / 2
    table = "model.embed_tokens.weight"
    torch.testing.assert_close(merge("tsv", base, sources, name=table), mean)
    spectral = merge("tsv", base, sources, name=table, svd_embeddings=True)
    assert not torch.allclose(spectral, mean, atol=1e-3)
    # A ViT positional embedding (wider than tall) is a matrix, as in the paper's code.
    wide = [s.T.contiguous() for s in sources]
    out = merge("tsv", base.T.contiguous(), wide, name="visual.positional_embedding")
    torch.testing.assert_close(out, merge("tsv", base.T.contiguous(), wide, name=MATRIX))
    assert not torch.allclose(out, mean.T, atol=1e-3)


# --------------------------------------------------------------------------- Iso-C / Iso-CTS


def test_iso_c_hand_computed_2x2() -> None:
    # sum = diag(3, 1): singular values (3, 1) -> both 2, same singular vectors.
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = merge("iso_c", base, [base + torch.eye(2), base + torch.diag(torch.tensor([2.0, 0.0]))])
    torch.testing.assert_close(out, base + 2.0 * torch.eye(2))
    # sum = diag(3, -1): the sign lives in the singular vectors and survives.
    out = merge(
        "iso_c",
        base,
        [base + torch.diag(torch.tensor([1.0, 0.0])), base + torch.diag(torch.tensor([2.0, -1.0]))],
        alpha=1.5,
    )
    torch.testing.assert_close(out, base + 1.5 * 2.0 * torch.diag(torch.tensor([1.0, -1.0])))


def test_iso_c_single_task_has_a_flat_spectrum_along_its_own_singular_vectors() -> None:
    gen = torch.Generator().manual_seed(5)
    tau = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    merged = iso_c_matrix(tau.unsqueeze(0))
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(torch.linalg.svdvals(merged), s.mean().expand(3))
    # merged v_j = mean(s) u_j for every right singular vector v_j of tau.
    torch.testing.assert_close(merged @ vh.T, s.mean() * u)


def test_iso_non_matrix_params_take_the_mean_of_task_vectors() -> None:
    for name in ("iso_c", "iso_cts"):
        out = merge(
            name, torch.ones(2), [torch.tensor([2.0, 3.0]), torch.tensor([4.0, 5.0])], name="bias"
        )
        torch.testing.assert_close(out, torch.tensor([3.0, 4.0]))


def test_iso_alpha_zero_returns_the_base() -> None:
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(4, 4, generator=gen)
    sources = [torch.randn(4, 4, generator=gen) for _ in range(2)]
    for name in ("iso_c", "iso_cts"):
        torch.testing.assert_close(merge(name, base, sources, alpha=0.0), base)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "expected"),
    [
        (10, 3, 0.8, (7, 1)),
        (4, 2, 0.5, (2, 1)),
        (768, 8, 0.8, (616, 19)),
        (2, 3, 0.0, (2, 0)),
        (6, 2, 0.0, (0, 3)),
        (5, 2, 1.0, (5, 0)),
    ],
)
def test_iso_cts_rank_split(rank: int, tasks: int, fraction: float, expected: tuple) -> None:
    assert split_rank(rank, tasks, fraction) == expected


def test_iso_cts_hand_computed_diagonal() -> None:
    # sum = diag(4, 3, 1, .75); common = top 2 (e1, e2 with 4, 3). Residuals: task 1 keeps
    # e3 (1.0), task 2 keeps e4 (0.25). Isotropic value = mean(1, .25, 4, 3) = 2.0625,
    # against Iso-C's mean(4, 3, 1, .75) = 2.1875.
    tau1 = torch.diag(torch.tensor([4.0, 0.0, 1.0, 0.5], dtype=torch.float64))
    tau2 = torch.diag(torch.tensor([0.0, 3.0, 0.0, 0.25], dtype=torch.float64))
    stacked = torch.stack([tau1, tau2])
    torch.testing.assert_close(
        iso_cts_matrix(stacked, 0.5), 2.0625 * torch.eye(4, dtype=torch.float64)
    )
    torch.testing.assert_close(iso_c_matrix(stacked), 2.1875 * torch.eye(4, dtype=torch.float64))


def test_iso_cts_is_isotropic_and_reduces_to_iso_c_without_task_space() -> None:
    gen = torch.Generator().manual_seed(7)
    stacked = torch.randn(3, 7, 6, generator=gen, dtype=torch.float64)
    merged = iso_cts_matrix(stacked, 0.5)
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, values.mean().expand(6))
    torch.testing.assert_close(iso_cts_matrix(stacked, 1.0), iso_c_matrix(stacked))


# --------------------------------------------------------------------------- MagMax


def test_magmax_picks_the_largest_magnitude_with_its_sign() -> None:
    base = torch.tensor([10.0, 20.0, 30.0, 40.0])
    taus = [
        torch.tensor([1.0, -3.0, 0.5, 0.0]),
        torch.tensor([-2.0, 2.0, -0.5, 0.0]),  # ties with task 1 at entry 2: the later wins
        torch.tensor([0.1, 0.0, 0.2, 0.0]),
    ]
    out = merge("magmax", base, [base + t for t in taus], **{"lambda": 1.0})
    torch.testing.assert_close(out, base + torch.tensor([-2.0, -3.0, -0.5, 0.0]))
    out = merge("magmax", base, [base + t for t in taus])  # default lambda 0.5
    torch.testing.assert_close(out, base + 0.5 * torch.tensor([-2.0, -3.0, -0.5, 0.0]))


def test_magmax_identical_models_at_lambda_one_return_the_model() -> None:
    gen = torch.Generator().manual_seed(8)
    base, model = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    torch.testing.assert_close(
        merge("magmax", base, [model, model.clone()], **{"lambda": 1.0}), model
    )


def test_max_magnitude_works_on_any_rank() -> None:
    stacked = torch.tensor([[[1.0, -5.0]], [[-4.0, 2.0]]])
    torch.testing.assert_close(max_magnitude(stacked), torch.tensor([[-4.0, -5.0]]))


# --------------------------------------------------------------------------- ExPO


def test_expo_alpha_zero_returns_the_model_exactly() -> None:
    gen = torch.Generator().manual_seed(9)
    base, model = torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen)
    assert torch.equal(merge("expo", base, [model], alpha=0.0), model)


def test_expo_hand_computed() -> None:
    base, model = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])
    # model + 0.3 (model - base) = [2 + .3, 0 - .6]
    torch.testing.assert_close(merge("expo", base, [model]), torch.tensor([2.3, -0.6]))
    torch.testing.assert_close(merge("expo", base, [model], alpha=1.0), torch.tensor([3.0, -2.0]))
    # Identical model and base: nothing to extrapolate.
    torch.testing.assert_close(merge("expo", base, [base.clone()], alpha=0.5), base)


# --------------------------------------------------------------------------- PCB-merging


def reference_pcb(task_vectors: np.ndarray, keep_ratio: float) -> np.ndarray:
    """PCB-merging as the official script computes it, with outlier clipping off (where the
    script's quantile clamp is the identity), transcribed step by step in float64."""
    n, d = task_vectors.shape
    magnitude = np.abs(task_vectors)

    def minmax(x: np.ndarray) -> np.ndarray:
        low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        return (x - low) / (high - low)

    intra = np.exp(n * minmax(magnitude) ** 2)  # unshifted, as in the paper's code
    inter = np.tanh(task_vectors * task_vectors.sum(axis=0))
    scores = intra * inter
    threshold = np.sort(scores, axis=1)[:, int(d * (1 - keep_ratio))][:, None]
    weights = minmax(np.clip(scores, threshold, None))
    return (task_vectors * weights).sum(axis=0) / np.maximum(weights.sum(axis=0), 1e-12)


@pytest.mark.parametrize("keep_ratio", [0.2, 0.5, 1.0])
def test_pcb_matches_the_official_algorithm(keep_ratio: float) -> None:
    rng = np.random.default_rng(10)
    taus = rng.normal(size=(3, 50))
    out = pcb_merge(torch.tensor(taus), keep_ratio=keep_ratio, clip_ratio=0.0)
    np.testing.assert_allclose(out.numpy(), reference_pcb(taus, keep_ratio), rtol=1e-9, atol=1e-12)


def test_pcb_hand_computed_identical_tasks_keep_all() -> None:
    # tau = [1, 2, 3] twice. intra ~ exp(2 * ([0, .5, 1]^2)); inter = tanh(2 tau^2) ~ [.96, 1, 1];
    # scores ~ [.96, 1.65, 7.39] * e^-2. Keeping everything, min-max rescaling still gives the
    # lowest score weight 0: entry 0 is dropped, the others are the (shared) task vector.
    base = torch.tensor([5.0, 5.0, 5.0])
    tau = torch.tensor([1.0, 2.0, 3.0])
    out = merge("pcb", base, [base + tau, base + tau], pcb_ratio=1.0, **{"lambda": 2.0})
    torch.testing.assert_close(out, base + 2.0 * torch.tensor([0.0, 2.0, 3.0]))


def test_pcb_identical_models_return_the_model_except_the_lowest_score() -> None:
    gen = torch.Generator().manual_seed(11)
    base, model = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    out = merge("pcb", base, [model, model.clone(), model.clone()], pcb_ratio=1.0)
    differs = ~torch.isclose(out, model)
    assert int(differs.sum()) == 1  # the one entry with the lowest balanced score ...
    torch.testing.assert_close(out[differs], base[differs])  # ... falls back to the base


def test_pcb_drops_by_ratio_and_zero_ratio_returns_the_base() -> None:
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(100, generator=gen)
    sources = [base + torch.randn(100, generator=gen) for _ in range(2)]
    torch.testing.assert_close(merge("pcb", base, sources, pcb_ratio=0.0), base)
    changed = (merge("pcb", base, sources, pcb_ratio=0.1) != base).sum()
    # Each task keeps 9 entries strictly above its threshold; their union is 9..18 entries.
    assert 9 <= int(changed) <= 18


def test_pcb_degenerate_rows() -> None:
    # One-element tensor: no ranking; agreeing tasks average, the opposing one is outvoted.
    out = merge("pcb", torch.zeros(1), [torch.tensor([1.0]), torch.tensor([-3.0])], pcb_ratio=1.0)
    torch.testing.assert_close(out, torch.tensor([-3.0]))
    # A task that left this tensor untouched does not dilute the other one.
    tau = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = merge("pcb", torch.zeros(4), [torch.zeros(4), tau], pcb_ratio=1.0)
    kept = out != 0
    torch.testing.assert_close(out[kept], tau[kept])
    assert int(kept.sum()) == 3


def test_pcb_many_tasks_do_not_overflow() -> None:
    gen = torch.Generator().manual_seed(13)
    base = torch.zeros(64)
    sources = [torch.randn(64, generator=gen) for _ in range(120)]
    assert torch.isfinite(merge("pcb", base, sources, pcb_ratio=0.5)).all()


def test_pcb_outlier_clipping_bounds_magnitudes() -> None:
    tau = torch.cat([torch.linspace(0.1, 1.0, 99), torch.tensor([1000.0])])
    # clip at the 2% quantiles: the outlier is pulled down to the 98th value.
    out = pcb_merge(torch.stack([tau, tau]), keep_ratio=1.0, clip_ratio=0.02)
    assert out.abs().max() <= float(torch.sort(tau).values[97]) + 1e-6


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_svd_failure_on_non_finite_input_is_a_merge_error(name: str) -> None:
    base = torch.zeros(3, 3)
    broken = torch.ones(3, 3)
    broken[0, 0] = float("nan")
    with pytest.raises(MergeError, match="q_proj"):
        merge(name, base, [broken, torch.ones(3, 3)], name="layers.0.q_proj.weight")
