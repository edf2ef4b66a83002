"""hrgrad_ext.backward: per-task gradients aggregated into .grad like loss.backward()."""

import pytest
import torch
from reference_impls import hrgrad_pinv_ref

import hrgrad_ext
from hrgrad_ext import ConFIG, HRGrad, Sum


def _model_and_losses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    unused = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(16, 3, dtype=torch.float64)
    out = model(x)
    losses = [out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean(), out.sum() * 0.1]
    return model, unused, losses


def _explicit_jacobian(losses, params):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("aggregator", [HRGrad(), Sum(), ConFIG()], ids=repr)
def test_backward_accumulates_the_aggregated_gradient(aggregator):
    model, unused, losses = _model_and_losses()
    params = list(model.parameters()) + [unused]
    J = _explicit_jacobian(losses, params)
    result = hrgrad_ext.backward(losses, params, aggregator=aggregator)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    expected = hrgrad_pinv_ref(J) if not isinstance(aggregator, Sum) else J.sum(0)
    torch.testing.assert_close(grads, expected, rtol=1e-8, atol=1e-10)
    assert torch.all(unused.grad == 0)
    torch.testing.assert_close(result.weights @ J, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(result.gram, J @ J.T, rtol=1e-10, atol=1e-12)


def test_backward_diagnostics_and_accumulation():
    model, unused, losses = _model_and_losses()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    J = _explicit_jacobian(losses, params)
    result = hrgrad_ext.backward(losses, params)
    update = hrgrad_pinv_ref(J)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), update + 1, rtol=1e-8, atol=1e-10)
    cos_update = (J @ update) / (J.norm(dim=1) * update.norm())
    torch.testing.assert_close(result.update_cosines, cos_update, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(result.norms, J.norm(dim=1), rtol=1e-10, atol=1e-12)
    assert result.status is not None and not result.fallback_used
    assert result.cosines.shape == (3, 3)


def test_backward_bad_arguments():
    model, _, losses = _model_and_losses()
    with pytest.raises(ValueError, match="no losses"):
        hrgrad_ext.backward([], model.parameters())
    with pytest.raises(ValueError, match="no parameters"):
        hrgrad_ext.backward(losses, [])
    with pytest.raises(ValueError, match="does not require grad"):
        hrgrad_ext.backward([torch.tensor(1.0)], model.parameters())
    with pytest.raises(ValueError, match="scalar"):
        hrgrad_ext.backward([torch.ones(2, requires_grad=True)], model.parameters())


def test_backward_named_losses_report_by_name():
    model, _, losses = _model_and_losses()
    params = list(model.parameters())
    J = _explicit_jacobian(losses, params)
    result = hrgrad_ext.backward({"pde": losses[0], "bc": losses[1], "ic": losses[2]}, params)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), hrgrad_pinv_ref(J), rtol=1e-8, atol=1e-10)
    assert result.names == ("pde", "bc", "ic")
    assert list(result.named_weights) == ["pde", "bc", "ic"]
    for k, name in enumerate(result.names):
        assert torch.equal(result.named_weights[name], result.weights[k])
        torch.testing.assert_close(result.named_norms[name], J[k].norm(), rtol=1e-10, atol=1e-12)
        assert torch.equal(result.named_update_cosines[name], result.update_cosines[k])
    cos_pde_bc = J[0] @ J[1] / (J[0].norm() * J[1].norm())
    torch.testing.assert_close(result.named_cosines["pde"]["bc"], cos_pde_bc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.named_cosines["bc"]["pde"], cos_pde_bc, rtol=1e-10, atol=1e-12)
    # a sequence gets positional names
    model, _, losses = _model_and_losses()
    assert list(hrgrad_ext.backward(losses, list(model.parameters())).named_weights) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="loss 'bc' must be a scalar"):
        hrgrad_ext.backward({"pde": losses[0], "bc": torch.ones(2, requires_grad=True)}, list(model.parameters()))
