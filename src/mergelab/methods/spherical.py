"""Spherical interpolation: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

Each method treats a weight tensor (or each row of it) as a point whose *direction* moves along
the unit hypersphere while its *length* is blended linearly. Names, defaults, thresholds and edge
cases follow mergekit 0.1.5, so a mergekit config gives the same numbers (up to float rounding).

Kernels compute in float32 (float64 if the inputs are float64) on the inputs' device and never
modify their inputs.
"""

from __future__ import annotations

import torch

from mergelab.errors import MergeError
from mergelab.methods.registry import (
    BlockAccess,
    Blockwise,
    MergeMethod,
    Param,
    TensorMerge,
    register,
)

# mergekit's SLERP falls back to linear interpolation above this |cos| (the spherical formula
# divides by sin(theta), which is ill-conditioned for (anti)parallel directions).
SLERP_DOT_THRESHOLD = 0.9995
# Below this norm a tensor has no usable direction; SLERP then divides by 1 instead.
SLERP_EPS = 1e-8
# NuSLERP: rows shorter than this are not rescaled when normalised ...
NUSLERP_NORM_EPS = 1e-7
# ... and rows with 1 - cos^2 <= eps^2 count as colinear (linear interpolation).
NUSLERP_COLINEAR_EPS = 1e-8


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def slerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    dot_threshold: float = SLERP_DOT_THRESHOLD,
    eps: float = SLERP_EPS,
) -> torch.Tensor:
    """Spherical linear interpolation from `v0` (t=0) to `v1` (t=1), over the whole tensor.

    Shoemake (1985): with theta the angle between the flattened tensors,
    result = sin((1-t) theta)/sin(theta) * v0 + sin(t theta)/sin(theta) * v1.
    The coefficients multiply the *unnormalised* tensors, so norms are carried along.

    Edge cases (as mergekit 0.1.5): when |cos theta| > `dot_threshold` (nearly parallel or
    antiparallel) the result is the linear (1-t) v0 + t v1; a tensor with norm <= `eps` is
    treated as having norm 1 (so a zero tensor is orthogonal to everything); t outside [0, 1]
    extrapolates.
    """
    dtype = _work_dtype(v0)
    a = v0.to(dtype).reshape(-1)
    b = v1.to(dtype).reshape(-1)
    if a.numel() == 0:
        t_ = torch.tensor(t, dtype=dtype, device=a.device)
        return ((1 - t_) * a + t_ * b).reshape(v0.shape)
    # Dividing the dot product afterwards avoids two full-size normalised copies; it differs from
    # normalising first only by rounding (float32 overflows only for norms above ~1e19).
    coef_a, coef_b = slerp_coefficients(
        t,
        torch.linalg.vector_norm(a),
        torch.linalg.vector_norm(b),
        torch.dot(a, b),
        dot_threshold=dot_threshold,
        eps=eps,
    )
    out = a * coef_a
    out.addcmul_(b, coef_b)
    return out.reshape(v0.shape)


def slerp_coefficients(
    t: float,
    norm_a: torch.Tensor,
    norm_b: torch.Tensor,
    dot: torch.Tensor,
    *,
    dot_threshold: float = SLERP_DOT_THRESHOLD,
    eps: float = SLERP_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two coefficients of `slerp` from the norms and dot product of the flattened ends.

    Split out so that a tensor too large to hold in memory can be slerped in blocks: the norms
    and the dot product are sums over entries (see `_slerp_prepare`).
    """
    dtype = norm_a.dtype
    t_ = torch.tensor(t, dtype=dtype, device=norm_a.device)
    one = torch.ones_like(norm_a)
    norm_a = torch.where(norm_a > eps, norm_a, one)
    norm_b = torch.where(norm_b > eps, norm_b, one)
    cos = (dot / (norm_a * norm_b)).clamp(-1, 1)
    linear = cos.abs() > dot_threshold
    # Keep acos/sin away from the singular point even on the branch torch.where discards.
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(linear, one, torch.sin(theta))
    coef_a = torch.where(linear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(linear, t_, torch.sin(t_ * theta) / sin_theta)
    return coef_a, coef_b


def nuslerp(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """NuSLERP (mergekit): SLERP from `v0` (t=0) to `v1` (t=1), whole-tensor or per vector.

    flatten=True interpolates the flattened tensors as one vector (like `slerp`); otherwise each
    vector along the last dimension is interpolated separately, or, with row_wise=True, each
    vector along dimension 0. Differences from `slerp` (kept from mergekit): vectors count as
    colinear only when 1 - cos^2 <= 1e-16 (then linear interpolation is used), and norms are
    clamped to >= 1e-7 instead of being replaced by 1.
    """
    dtype = _work_dtype(v0)
    a = v0.to(dtype)
    b = v1.to(dtype)
    if flatten or a.ndim == 0:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    t_ = torch.tensor(t, dtype=dtype, device=a.device)

    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    norm_b = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = (torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1) / (norm_a * norm_b)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(cos), torch.sin(theta))
    coef_a = torch.where(colinear, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(colinear, t_, torch.sin(t_ * theta) / sin_theta)
    out = a * coef_a
    out.addcmul_(b, coef_b)

    if row_wise and not flatten and v0.ndim > 0:
        out = out.transpose(0, -1)
    return out.reshape(v0.shape).contiguous()


def nuslerp_t(weights: list[float]) -> float:
    """mergekit's NuSLERP factor t = w2 / (w1 + w2), or 0.5 when the weights sum to ~0."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def multislerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    name: str = "",
) -> torch.Tensor:
    """Barycentric interpolation of several tensors on the hypersphere (Goddard, Multi-SLERP).

    With a base, the task vectors `tensor - base` are interpolated and the base added back.
    Each vector is projected onto the unit sphere; their weighted Euclidean mean, normalised,
    is the tangent point; the weighted tangent vectors are averaged and mapped back with the
    exponential map; the result is scaled by the weighted mean of the norms.

    Edge cases (as mergekit 0.1.5): one tensor is returned unchanged (even with a base); if
    the weighted mean of the unit vectors vanishes (antipodal inputs with balancing weights),
    two tensors fall back to the linear sum w1 x1 + w2 x2, and more raise MergeError.
    Unlike mergekit, when every task vector is zero (a tensor no model changed, e.g. an unused
    pooler) the base is returned instead of an error: there is no direction to interpolate.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = _work_dtype(tensors[0])
    shape = tensors[0].shape
    device = tensors[0].device
    w = torch.tensor(weights, dtype=dtype, device=device)
    if normalize_weights:
        total = float(w.sum())
        if total == 0.0:
            raise MergeError(
                f"multislerp: the `weight`s of tensor {name!r} sum to zero, so they cannot "
                "be normalised (set normalize_weights: false or change the weights)"
            )
        w = w / w.sum()

    base_flat = None if base is None else base.to(dtype).reshape(-1)
    # Task vectors are built one at a time instead of stacked, so at most one extra copy per
    # input lives at once.
    vectors = [x.to(dtype).reshape(-1) for x in tensors]
    if base_flat is not None:
        vectors = [x - base_flat for x in vectors]
    norms = torch.stack([torch.linalg.vector_norm(x) for x in vectors])
    if base_flat is not None and bool((norms == 0).all()):
        return base_flat.reshape(shape).clone()
    inv = 1 / (norms + eps)

    mean = torch.zeros_like(vectors[0])
    for i, x in enumerate(vectors):
        mean.add_(x * (inv[i] * w[i]))
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(vectors) == 2:
            res = vectors[0] * w[0] + vectors[1] * w[1]
            if base_flat is not None:
                res = res + base_flat
            return res.reshape(shape)
        raise MergeError(
            f"multislerp: the weighted sum of the inputs of tensor {name!r} is zero (antipodal "
            "inputs whose `weight`s balance out); use different weights"
        )
    mean = mean / mean_norm

    # Tangent-space average at `mean`: sum_i w_i (u_i - <u_i, mean> mean). Analytically this
    # vanishes when `mean` is the normalised weighted mean (as here), so the exponential map is
    # close to the identity; it is kept to give mergekit's numbers.
    tangent = torch.zeros_like(mean)
    for i, x in enumerate(vectors):
        unit = x * inv[i]
        dot = torch.dot(unit, mean)
        tangent.add_((unit - dot * mean) * w[i])
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms * w).sum()
    if base_flat is not None:
        result = result + base_flat
    return result.reshape(shape)


def karcher_mean(
    tensors: list[torch.Tensor],
    weights: list[float],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the tensors' directions, times their mean norm.

    Karcher (1977), as used for model merging in arXiv:2603.04972: start from the normalised
    weighted Euclidean mean of the unit directions and take up to `max_iter` Riemannian
    gradient steps, mean <- exp_mean(sum_i a_i log_mean(u_i)), stopping once the step norm is
    below `tol`. The result is scaled by sum_i w_i ||x_i|| over *all* inputs.

    Edge cases (as mergekit 0.1.5): inputs with norm <= `tol` carry no direction and are left
    out of the direction average (their weights renormalised away); if all are that short the
    result is zero; if the initial Euclidean mean is ~0 the first direction starts the
    iteration; directions within `tol` radians of the current mean contribute no step.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = _work_dtype(tensors[0])
    shape = tensors[0].shape
    vectors = [x.to(dtype).reshape(-1) for x in tensors]
    norms = [torch.linalg.vector_norm(x) for x in vectors]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros(shape, dtype=dtype, device=vectors[0].device)

    valid_total = sum(weights[i] for i in valid)
    alphas = {i: weights[i] / valid_total for i in valid}
    # Unit directions are formed on the fly (x / ||x||) rather than stored, to keep one copy.
    mean = torch.zeros_like(vectors[0])
    for i in valid:
        mean.add_(vectors[i] / norms[i] * alphas[i])
    mean_norm = torch.linalg.vector_norm(mean)
    mean = vectors[valid[0]] / norms[valid[0]] if float(mean_norm) < tol else mean / mean_norm

    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for i in valid:
            unit = vectors[i] / norms[i]
            dot = torch.dot(mean, unit).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            # log map of `unit` at `mean`, weighted: a_i * theta / sin(theta) * (u - cos * mean)
            step.add_((unit - dot * mean) * (alphas[i] * theta / torch.sin(theta)))
        step_norm = torch.linalg.vector_norm(step)
        if float(step_norm) < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm

    scale = sum(w * n for w, n in zip(weights, norms, strict=True))
    return (mean * scale).reshape(shape)


# --- registry kernels -----------------------------------------------------------------------


def _slerp_kernel(m: TensorMerge) -> torch.Tensor:
    if m.base is None:
        raise MergeError(f"slerp needs a base model (the t=0 end) for tensor {m.name!r}")
    return slerp(float(m.params["t"]), m.base, m.tensors[0])


def _slerp_prepare(access: BlockAccess) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-tensor sums for blockwise slerp: |a|^2, |b|^2 and a.b, accumulated in float64."""
    sums = torch.zeros(3, dtype=torch.float64)
    dtype = torch.float32
    for block in access.blocks():
        if block.base is None:
            raise MergeError(f"slerp needs a base model (the t=0 end) for tensor {block.name!r}")
        a = block.base.reshape(-1).double()
        b = block.tensors[0].reshape(-1).double()
        sums += torch.stack([a.dot(a), b.dot(b), a.dot(b)]).cpu()
        dtype = block.base.dtype
    norm_a, norm_b, dot = sums[0].sqrt(), sums[1].sqrt(), sums[2]
    return slerp_coefficients(
        float(access.meta.params["t"]), norm_a.to(dtype), norm_b.to(dtype), dot.to(dtype)
    )


def _slerp_apply(block: TensorMerge, coefficients: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    coef_a, coef_b = (c.to(block.base.device) for c in coefficients)
    out = block.base * coef_a
    return out.addcmul_(block.tensors[0], coef_b)


def _nuslerp_kernel(m: TensorMerge) -> torch.Tensor:
    t = nuslerp_t([float(w) for w in m.per_model("weight")])
    row_wise = bool(m.params["nuslerp_row_wise"])
    flatten = bool(m.params["nuslerp_flatten"])
    a, b = m.tensors
    if m.base is None:
        return nuslerp(t, a, b, row_wise=row_wise, flatten=flatten)
    base = m.base.to(_work_dtype(m.base))
    return base + nuslerp(t, a - base, b - base, row_wise=row_wise, flatten=flatten)


def _multislerp_kernel(m: TensorMerge) -> torch.Tensor:
    return multislerp(
        m.tensors,
        [float(w) for w in m.per_model("weight")],
        m.base,
        normalize_weights=bool(m.params["normalize_weights"]),
        eps=float(m.params["eps"]),
        name=m.name,
    )


def _karcher_kernel(m: TensorMerge) -> torch.Tensor:
    n = len(m.tensors)
    return karcher_mean(
        m.tensors,
        [1.0 / n] * n,
        max_iter=int(m.params["max_iter"]),
        tol=float(m.params["tol"]),
    )


register(
    MergeMethod(
        name="slerp",
        mergekit=True,
        title="SLERP",
        paper="Shoemake, Animating Rotation with Quaternion Curves (SIGGRAPH 1985)",
        url="https://en.wikipedia.org/wiki/Slerp",
        kernel=_slerp_kernel,
        params=(
            Param(
                "t",
                float,
                None,
                "interpolation factor: 0 gives the base model, 1 the other model "
                "(values outside [0, 1] extrapolate)",
            ),
        ),
        base="required",
        min_models=1,
        max_models=1,
        blockwise=Blockwise(apply=_slerp_apply, prepare=_slerp_prepare),
    )
)

register(
    MergeMethod(
        name="nuslerp",
        mergekit=True,
        title="NuSLERP",
        paper="Goddard et al., Arcee's MergeKit (arXiv:2403.13257), NuSLERP method",
        url="https://arxiv.org/abs/2403.13257",
        kernel=_nuslerp_kernel,
        params=(
            Param(
                "weight",
                float,
                None,
                "relative weight of this model; t = weight2 / (weight1 + weight2), "
                "or 0.5 when they sum to ~0",
                per_model=True,
            ),
            Param(
                "nuslerp_row_wise",
                bool,
                False,
                "interpolate each vector along dimension 0 separately "
                "(only when nuslerp_flatten is false)",
            ),
            Param(
                "nuslerp_flatten",
                bool,
                True,
                "interpolate the whole tensor as one vector; if false, each vector along the "
                "last dimension (or dimension 0 with nuslerp_row_wise) separately",
            ),
        ),
        base="optional",
        min_models=2,
        max_models=2,
    )
)

register(
    MergeMethod(
        name="multislerp",
        mergekit=True,
        title="Multi-SLERP",
        paper="Goddard, Multi-SLERP: barycentric interpolation on a hypersphere (2024)",
        url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        kernel=_multislerp_kernel,
        params=(
            Param("weight", float, None, "weight of this model", per_model=True),
            Param("normalize_weights", bool, True, "divide the weights by their sum"),
            Param("eps", float, 1e-8, "small constant for numerical stability", low=0.0),
        ),
        base="optional",
        min_models=1,
    )
)

register(
    MergeMethod(
        name="karcher",
        mergekit=True,
        title="Karcher Mean",
        paper="Karcher, Riemannian center of mass (1977); Karcher-mean merging (arXiv:2603.04972)",
        url="https://arxiv.org/abs/2603.04972",
        kernel=_karcher_kernel,
        params=(
            Param("max_iter", int, 10, "maximum number of Riemannian gradient steps", low=0),
            Param("tol", float, 1e-5, "stop when the step norm falls below this", low=0.0),
        ),
        base="none",
        min_models=1,
    )
)
