"""Kernels of the FusionBench-leading data-free methods: LiNeS, Consensus merging, WUDI.

Hand-computed values on tiny tensors, properties from each paper's formula (hypothesis), and
end-to-end merges through the plan and engine (YAML config -> merged state dict) that check
the depth the planner hands LiNeS and the `k` check Consensus needs before any work.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab
from mergelab.errors import ConfigError
from mergelab.methods import get_method
from mergelab.methods.tall_masks import consensus_mask, tall_masks
from mergelab.methods.wudi import interference_terms, wudi_adam, wudi_closed_form, wudi_loss

MATRIX = "model.layers.0.mlp.down_proj.weight"
NEW = ("lines", "consensus", "wudi")


def merge(
    method_name: str,
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    name: str = MATRIX,
    depth: float = 0.0,
    **params: float | bool,
) -> torch.Tensor:
    """Run a registered kernel as the engine does (conftest.run_kernel), base held apart."""
    return run_kernel(method_name, tensors, base, params, tensor_name=name, depth=depth)


# --------------------------------------------------------------------------- declarations


@pytest.mark.parametrize(
    ("name", "arxiv"), [("lines", "2410.17146"), ("consensus", "2405.07813"), ("wudi", "2503.08099")]
)
def test_declarations_cite_their_paper_and_need_a_base(name: str, arxiv: str) -> None:
    method = get_method(name)
    assert method.url == f"https://arxiv.org/abs/{arxiv}"
    assert method.title and method.paper
    assert method.base == "required" and not method.needs


@pytest.mark.parametrize(
    ("name", "param", "bad"),
    [
        ("lines", "alpha", -0.1),
        ("lines", "beta", 11.0),
        ("consensus", "k", -1),
        ("consensus", "k", 1.5),
        ("consensus", "mask_lambda", -0.2),
        ("wudi", "iterations", -1),
        ("wudi", "learning_rate", 2.0),
        ("wudi", "closed_form", 1),
    ],
)
def test_out_of_range_parameters_are_rejected_with_their_name(name, param, bad) -> None:
    declared = get_method(name).param(param)
    assert declared is not None
    problem = declared.check(bad)
    assert problem is not None and f"`{param}`" in problem


def test_defaults() -> None:
    def default(method: str, param: str) -> object:
        declared = get_method(method).param(param)
        assert declared is not None
        return declared.default

    assert default("lines", "alpha") == 1.0  # units of 1/num_models: the paper's alpha
    assert default("consensus", "k") == 2
    assert default("wudi", "iterations") == 300
    assert default("wudi", "learning_rate") == 1e-5
    assert default("wudi", "lambda") == 1.0


@pytest.mark.parametrize("name", NEW)
def test_output_keeps_shape_and_float32(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=gen)
    sources = [base + 0.1 * torch.randn(6, 4, generator=gen) for _ in range(3)]
    out = merge(name, base, sources)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- LiNeS


def test_lines_hand_computed_over_depth() -> None:
    base = torch.tensor([1.0, 2.0])
    a, b = base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 4.0])
    # sum of task vectors = [2, 4]; alpha = 1/2 (two tasks), beta = 0.5
    assert torch.allclose(merge("lines", base, [a, b], depth=0.0), torch.tensor([2.0, 4.0]))
    assert torch.allclose(merge("lines", base, [a, b], depth=1.0), torch.tensor([3.0, 6.0]))
    # depth 0.5: scale 0.5 + 0.25
    assert torch.allclose(merge("lines", base, [a, b], depth=0.5), torch.tensor([2.5, 5.0]))
    # alpha 0, beta 1 at depth 0.25: scale 0.25
    out = merge("lines", base, [a, b], depth=0.25, alpha=0.0, beta=1.0)
    assert torch.allclose(out, torch.tensor([1.5, 3.0]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_lines_identical_models_give_the_model_back_at_the_first_layer(
    count: int, depth: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 5, generator=gen)
    model = base + torch.randn(3, 5, generator=gen)
    out = merge("lines", base, [model] * count, depth=0.0)
    assert torch.allclose(out, model, atol=1e-5)
    # deeper layers move further along the same task vector, never off it
    deeper = merge("lines", base, [model] * count, depth=depth)
    assert torch.allclose(deeper - base, (1.0 + 0.5 * depth * count) * (model - base), atol=1e-4)


# --------------------------------------------------------------------------- Consensus


def test_tall_masks_and_consensus_hand_computed() -> None:
    tau = torch.tensor(
        [
            [1.0, 0.1, -1.0, 0.0],
            [1.0, -2.0, 0.0, 0.0],
            [1.0, 0.0, 1.0, 0.0],
        ]
    )
    total = tau.sum(dim=0)  # [3, -1.9, 0, 0]
    # |tau_t| > 0.4 |total - tau_t|:
    # entry 0: 1 > 0.4 * 2 = 0.8 for all three tasks
    # entry 1: task 0: 0.1 > 0.4*2.0=0.8 no; task 1: 2 > 0.4*0.1 yes; task 2: 0 > ... no
    # entry 2: task 0: 1 > 0.4*1 yes; task 1: 0 > 0 no; task 2: 1 > 0.4 yes
    # entry 3: 0 > 0 no for all
    masks = tall_masks(tau, total, 0.4)
    expected = torch.tensor(
        [[True, False, True, False], [True, True, False, False], [True, False, True, False]]
    )
    assert torch.equal(masks, expected)
    assert torch.equal(consensus_mask(masks, 2), torch.tensor([True, False, True, False]))
    assert torch.equal(consensus_mask(masks, 1), torch.tensor([True, True, True, False]))
    base = torch.zeros(4)
    out = merge("consensus", base, list(tau), **{"lambda": 0.5, "k": 2})
    assert torch.allclose(out, torch.tensor([1.5, 0.0, 0.0, 0.0]))


def test_consensus_k_zero_is_task_arithmetic_and_k_above_tasks_is_the_base() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 4, generator=gen)
    sources = [base + torch.randn(4, 4, generator=gen) for _ in range(3)]
    summed = sum(s - base for s in sources)
    out = merge("consensus", base, sources, **{"lambda": 0.3, "k": 0})
    assert torch.allclose(out, base + 0.3 * summed, atol=1e-6)
    assert torch.allclose(merge("consensus", base, sources, k=4), base)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_consensus_identical_models_at_lambda_one_over_n_give_the_model_back(
    count: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(5, 3, generator=gen)
    model = base + torch.randn(5, 3, generator=gen)
    # identical tasks: tau_sum = n tau, and |tau| > 0.4 (n - 1) |tau| holds for n <= 3
    k = min(count, 2)
    mask_lambda = 0.9 / max(count - 1, 1)
    out = merge("consensus", base, [model] * count, k=k, mask_lambda=mask_lambda,
                **{"lambda": 1.0 / count})
    assert torch.allclose(out, model, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_consensus_keeps_a_subset_of_the_summed_task_vector(count: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, generator=gen)
    sources = [base + torch.randn(6, generator=gen) for _ in range(count)]
    summed = sum(s - base for s in sources)
    delta = merge("consensus", base, sources, **{"lambda": 1.0, "k": 1}) - base
    kept = delta != 0
    assert torch.allclose(delta[kept], summed[kept], atol=1e-5)


# --------------------------------------------------------------------------- WUDI


def test_wudi_closed_form_hand_computed() -> None:
    # tau_1 = [2, 0], tau_2 = [1, 1] (1 x 2): w = (1/4, 1/2);
    # M = [[1.5, .5], [.5, .5]], N = [3, 1]; tau M = N gives tau = [2, 0], where both tasks'
    # interference (tau - tau_i) . tau_i is zero.
    task_vectors = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]])
    m, n = interference_terms(task_vectors)
    assert torch.allclose(m, torch.tensor([[1.5, 0.5], [0.5, 0.5]]))
    assert torch.allclose(n, torch.tensor([[3.0, 1.0]]))
    solved = wudi_closed_form(task_vectors)
    assert torch.allclose(solved, torch.tensor([[2.0, 0.0]]), atol=1e-6)
    assert float(wudi_loss(solved, task_vectors)) < 1e-10


def test_wudi_first_adam_step_moves_each_entry_by_the_learning_rate() -> None:
    # From the sum [3, 1]: gradient 2 (tau M - N) = 2 ([5, 2] - [3, 1]) = [4, 2] > 0, and
    # Adam's first step is -lr * sign(grad) (up to eps).
    task_vectors = torch.tensor([[[2.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
    out = wudi_adam(task_vectors, iterations=1, learning_rate=0.01)
    assert torch.allclose(out, torch.tensor([[2.99, 0.99]], dtype=torch.float64), atol=1e-8)


def test_wudi_gradient_matches_autograd_of_the_papers_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    task_vectors = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    point = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    wudi_loss(point, task_vectors).backward()
    m, n = interference_terms(task_vectors)
    assert torch.allclose(point.grad, 2.0 * (point.detach() @ m - n), atol=1e-10)


def test_wudi_adam_converges_to_the_closed_form_and_lowers_the_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    task_vectors = 0.01 * torch.randn(3, 6, 10, generator=gen, dtype=torch.float64)
    exact = wudi_closed_form(task_vectors)
    adam = wudi_adam(task_vectors, iterations=3000, learning_rate=1e-4)
    assert torch.allclose(adam, exact, atol=1e-5)
    few = wudi_adam(task_vectors, iterations=50, learning_rate=1e-5)
    assert wudi_loss(few, task_vectors) < wudi_loss(task_vectors.sum(0), task_vectors)


def test_wudi_orthogonal_tasks_give_their_sum() -> None:
    # Row spaces that are mutually orthogonal do not interfere: the minimiser is the sum.
    base = torch.zeros(2, 4)
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 3.0, 1.0], [0.0, 0.0, -1.0, 2.0]])
    out = merge("wudi", base, [a, b], closed_form=True)
    assert torch.allclose(out, a + b, atol=1e-5)


def test_wudi_non_matrices_and_vocabulary_tables_take_the_mean() -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(5, generator=gen)
    sources = [base + torch.randn(5, generator=gen) for _ in range(2)]
    mean = base + sum(s - base for s in sources) / 2
    assert torch.allclose(merge("wudi", base, sources, name="model.norm.weight"), mean)
    table = torch.randn(12, 3, generator=gen)
    rows = [table + torch.randn(12, 3, generator=gen) for _ in range(2)]
    out = merge("wudi", table, rows, name="model.embed_tokens.weight")
    assert torch.allclose(out, table + sum(r - table for r in rows) / 2, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_wudi_identical_models_give_the_model_back(count: int, exact: bool, seed: int) -> None:
    # n identical task vectors: the loss n ||(tau - tau_1) tau_1^T||^2 / ||tau_1||^2 is zero at
    # tau_1 exactly; the closed form finds it; Adam starts there with n = 1 but normalises
    # float noise of the zero gradient into steps of up to lr, so it stays within
    # iterations * lr = 3e-3 of it.
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=gen)
    model = base + torch.randn(4, 6, generator=gen)
    if not exact and count > 1:
        count = 1
    out = merge("wudi", base, [model] * count, closed_form=exact)
    assert torch.allclose(out, model, atol=1e-4 if exact else 3e-3)


def test_wudi_zero_task_vectors_are_left_out() -> None:
    base = torch.ones(2, 3)
    a = base + torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = merge("wudi", base, [a, base.clone()], closed_form=True)
    assert torch.allclose(out, a, atol=1e-6)
    assert torch.equal(merge("wudi", base, [base.clone(), base.clone()]), base)


# --------------------------------------------------------------------------- through the engine


def _layered_model(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(10, 4, generator=gen)}
    for i in range(layers):
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(6, 4, generator=gen)
        sd[f"model.layers.{i}.mlp.up_proj.bias"] = torch.randn(6, generator=gen)
    sd["model.norm.weight"] = torch.randn(4, generator=gen)
    return sd


def _config(method: str, parameters: dict | None = None) -> dict:
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}],
        "parameters": parameters or {},
    }


def test_lines_through_the_engine_scales_each_layer_by_its_depth() -> None:
    sds = {"base": _layered_model(0), "a": _layered_model(1), "b": _layered_model(2)}
    merged = mergelab.merge_state_dicts(_config("lines", {"beta": 1.0}), sds)
    for name, value in merged.items():
        summed = sds["a"][name] + sds["b"][name] - 2 * sds["base"][name]
        depth = int(name.split(".")[2]) / 2 if ".layers." in name else 0.0
        expected = sds["base"][name] + (0.5 + depth) * summed
        assert torch.allclose(value, expected, atol=1e-5), name
    # the same numbers as task arithmetic with a per-layer lambda gradient
    gradient = mergelab.merge_state_dicts(
        {**_config("task_arithmetic", {"lambda": [0.5, 1.5]}),
         "models": [{"model": "a", "parameters": {"weight": 1.0}},
                    {"model": "b", "parameters": {"weight": 1.0}}]},
        sds,
    )
    for name in merged:
        assert torch.allclose(merged[name], gradient[name], atol=1e-5), name


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("consensus", {"k": 1}), ("wudi", {"iterations": 20}), ("wudi", {"closed_form": True})],
)
def test_yaml_configs_merge_in_memory(method: str, parameters: dict) -> None:
    sds = {"base": _layered_model(0), "a": _layered_model(1), "b": _layered_model(2)}
    merged = mergelab.merge_state_dicts(_config(method, parameters), sds)
    assert set(merged) == set(sds["base"])
    for name, value in merged.items():
        kernel_out = merge(method, sds["base"][name], [sds["a"][name], sds["b"][name]],
                           name=name, **parameters)
        assert torch.allclose(value, kernel_out, atol=1e-6), name


def test_consensus_k_above_the_number_of_models_fails_before_work() -> None:
    sds = {"base": _layered_model(0), "a": _layered_model(1), "b": _layered_model(2)}
    with pytest.raises(ConfigError, match=r"`k` must be at most the number of models \(2\); got 3"):
        mergelab.merge_state_dicts(_config("consensus", {"k": 3}), sds)


# --------------------------------------------------------------------------- differential


def reference_wudi(task_vectors: torch.Tensor, iterations: int, learning_rate: float) -> torch.Tensor:
    """WUDI as FusionBench runs it (fusion_bench/method/wudi/wudi.py), written out here: the
    paper's loss through autograd, torch.optim.Adam from the sum of the task vectors."""
    merged = torch.nn.Parameter(task_vectors.sum(dim=0).clone())
    optimiser = torch.optim.Adam([merged], lr=learning_rate, weight_decay=0)
    squared_norms = task_vectors.reshape(task_vectors.shape[0], -1).norm(dim=-1).square()
    for _ in range(iterations):
        product = (merged.unsqueeze(0) - task_vectors) @ task_vectors.transpose(1, 2)
        loss = (product.square() / squared_norms[:, None, None]).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return merged.detach()


@pytest.mark.parametrize(("iterations", "learning_rate"), [(300, 1e-5), (60, 1e-3)])
def test_wudi_matches_the_reference_autograd_adam(iterations: int, learning_rate: float) -> None:
    gen = torch.Generator().manual_seed(4)
    task_vectors = 0.01 * torch.randn(3, 8, 12, generator=gen, dtype=torch.float64)
    expected = reference_wudi(task_vectors, iterations, learning_rate)
    assert torch.allclose(wudi_adam(task_vectors, iterations, learning_rate), expected, atol=1e-9)


def test_wudi_streams_vocabulary_tables_by_blocks_and_solves_matrices_whole(monkeypatch) -> None:
    import mergelab.engine.execute as execute

    monkeypatch.setattr(execute, "row_blocks", lambda shape: [(0, 4), (4, shape[0])])
    sds = {"base": _layered_model(0), "a": _layered_model(1), "b": _layered_model(2)}
    seen = []
    real = execute.merge_blockwise
    monkeypatch.setattr(execute, "merge_blockwise",
                        lambda plan, task, *a, **k: (seen.append(task.name), real(plan, task, *a, **k)))
    merged = mergelab.merge_state_dicts(_config("wudi", {"closed_form": True}), sds)
    # the (10 x 4) table and the vectors go by blocks; the (6 x 4) weights are solved whole
    assert "model.embed_tokens.weight" in seen
    assert not any(name.endswith("up_proj.weight") for name in seen)
    for name, value in merged.items():
        expected = merge("wudi", sds["base"][name], [sds["a"][name], sds["b"][name]], name=name,
                         closed_form=True)  # fmt: skip
        assert torch.allclose(value, expected, atol=1e-6), name
