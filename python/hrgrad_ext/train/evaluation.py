"""Scoring a trained APNN against reference solutions (relative L2 on the reference grid).

Uses :mod:`hrgrad_ext.problems` when it provides ``evaluate``/``reference`` for the problem,
else the solvers of :mod:`hrgrad_ext.reference` directly: transport references come from
``solve_transport`` for eps >= its lower limit and from the diffusion-limit series below it;
BGK references from ``solve_bgk(case, kn, t_final)``. Both are cached on disk by the reference
package, so repeated evaluations are cheap.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .losses import BGKFormulation, Formulation, TransportFormulation

__all__ = ["evaluate", "predict", "reference_profiles", "rel_l2"]


def rel_l2(ref: np.ndarray, pred: np.ndarray) -> float:
    """``sqrt(sum (ref - pred)^2 / sum ref^2)``."""
    ref = np.asarray(ref, dtype=float)
    pred = np.asarray(pred, dtype=float)
    return float(np.sqrt(np.sum((ref - pred) ** 2) / np.sum(ref ** 2)))


_REF_CACHE: dict = {}


def reference_profiles(form: Formulation, eps: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(x, {quantity: values})`` of the reference solution at the final time."""
    t_final = form.t_range[1]
    key = (form.name, getattr(form, "case", None), float(eps), t_final)
    if key in _REF_CACHE:
        return _REF_CACHE[key]
    from .. import reference as R

    if isinstance(form, TransportFormulation):
        from ..reference import transport as RT

        eps_min = getattr(RT, "EPS_MIN", 1e-6)
        if eps >= eps_min:
            r = R.solve_transport(float(eps), t_final, store_f=False)
            rho = np.asarray(r.rho)
            # 0 <= f <= 1 for this data (inflow 1, initial 0), so rho <= 1; a reference that
            # breaks that bound is wrong and would make any score meaningless
            if rho.max() > 1.0 + 1e-6:
                raise RuntimeError(f"transport reference for eps={eps:g} violates the maximum principle "
                                   f"(max rho = {rho.max():.3g} > 1); refusing to score against it")
            out = (np.asarray(r.x), {"rho": rho})
        else:
            # below the solver's range the diffusion limit is the reference (error O(eps))
            nx = getattr(RT, "DEFAULT_NX", 300)
            x = (np.arange(nx) + 0.5) / nx
            out = (x, {"rho": np.asarray(R.diffusion_limit(x, t_final))})
    elif isinstance(form, BGKFormulation):
        r = R.solve_bgk(form.case, float(eps), t_final, store_f=False)
        rho = np.asarray(r.density)
        u = np.asarray(r.momentum) / rho
        T = 2.0 * np.asarray(r.energy) / rho - u * u
        out = (np.asarray(r.x), {"rho": rho, "u": u, "T": T})
    else:
        raise TypeError(f"no reference for formulation {type(form).__name__}")
    _REF_CACHE[key] = out
    return out


@torch.no_grad()
def predict(model: nn.Module, form: Formulation, x: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """The model's macroscopic quantities at the final time on the points ``x``."""
    p = next(model.parameters())
    xt = torch.as_tensor(np.asarray(x), dtype=p.dtype, device=p.device)
    t = torch.full_like(xt, form.t_range[1])
    e = torch.tensor(float(eps), dtype=p.dtype, device=p.device)
    out = model.macroscopic(t, xt, e)
    return {k: v.double().cpu().numpy() for k, v in out.items()}


def evaluate(model: nn.Module, form: Formulation, eps_values) -> dict[str, dict[str, float]]:
    """``{f"{eps:g}": {quantity: rel L2}}`` for every eps and every quantity of the problem."""
    was_training = model.training
    model.eval()
    try:
        result = {}
        for eps in eps_values:
            x, ref = reference_profiles(form, eps)
            pred = predict(model, form, x, eps)
            result[f"{eps:g}"] = {q: rel_l2(ref[q], pred[q]) for q in form.quantities}
        return result
    finally:
        model.train(was_training)
