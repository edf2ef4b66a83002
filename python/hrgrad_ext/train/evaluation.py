"""Scoring a trained APNN against the reference solutions of :mod:`hrgrad_ext.problems`.

Errors are relative L2 at the end of each task's time window on the reference's own grid (the problems'
``evaluate``): transport scores the density, BGK the density, momentum and energy. The
references are cached on disk by :mod:`hrgrad_ext.reference`, and in memory here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..problems import BGK, KineticProblem, LinearTransport
from .losses import BGKFormulation, Formulation, TransportFormulation

__all__ = ["evaluate", "predict", "problem_for", "reference_profiles"]

_PROBLEMS: dict = {}


def problem_for(form: Formulation, dtype: torch.dtype = torch.float64, device=None,
                t_final: float | None = None) -> KineticProblem:
    """The problem definition (reference, scoring) matching a loss formulation, at time
    ``t_final`` (default: the end of the formulation's longest window)."""
    t_final = form.t_range[1] if t_final is None else float(t_final)
    key = (form.name, getattr(form, "case", None), t_final, dtype, str(device))
    if key not in _PROBLEMS:
        if isinstance(form, TransportFormulation):
            _PROBLEMS[key] = LinearTransport(t_final=t_final, dtype=dtype, device=device)
        elif isinstance(form, BGKFormulation):
            _PROBLEMS[key] = BGK(form.case, t_final=t_final, dtype=dtype, device=device)
        else:
            raise TypeError(f"no reference for formulation {type(form).__name__}")
    return _PROBLEMS[key]


def reference_profiles(form: Formulation, eps: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(x, {quantity: values})`` of the reference at the end of task ``eps``'s window, in the
    formulation's quantities (transport: rho; BGK: rho, u, T)."""
    ref = problem_for(form, t_final=form.t_final_for(eps)).reference(eps)
    if isinstance(form, TransportFormulation):
        return np.asarray(ref.x), {"rho": np.asarray(ref.rho)}
    rho = np.asarray(ref.density)
    u = np.asarray(ref.momentum) / rho
    T = 2.0 * np.asarray(ref.energy) / rho - u * u
    return np.asarray(ref.x), {"rho": rho, "u": u, "T": T}


@torch.no_grad()
def predict(model: nn.Module, form: Formulation, x: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """The model's macroscopic quantities at the end of task ``eps``'s window on the points ``x``."""
    p = next(model.parameters())
    xt = torch.as_tensor(np.asarray(x), dtype=p.dtype, device=p.device)
    t = torch.full_like(xt, form.t_final_for(eps))
    e = torch.tensor(float(eps), dtype=p.dtype, device=p.device)
    out = model.macroscopic(t, xt, e)
    return {k: v.double().cpu().numpy() for k, v in out.items()}


def evaluate(model: nn.Module, form: Formulation, eps_values) -> dict[str, dict[str, float]]:
    """``{f"{eps:g}": {quantity: rel L2}}`` for every eps at the end of its window (see the
    problems' ``evaluate``)."""
    p = next(model.parameters())

    def model_fn(t, x, eps):
        return model.macroscopic(t, x, torch.tensor(eps, dtype=p.dtype, device=p.device))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {f"{eps:g}": problem_for(form, p.dtype, p.device, form.t_final_for(eps)).evaluate(model_fn, eps)
                    for eps in eps_values}
    finally:
        model.train(was_training)
