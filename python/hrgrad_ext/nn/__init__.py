"""Neural networks for multi-Knudsen APNNs: the eps encoding, MLP/ResNet bodies and the
linear-transport (micro-macro) and BGK models.

Every model takes the small parameter eps (Knudsen number) as an input through an explicit
:class:`EpsEncoding`, so one network covers all regimes. Models expose their pieces as methods
(``rho``, ``g_raw``, ``f``, ``macro``) and also through ``forward(method, *args)`` so that
:func:`torch.func.functional_call` can evaluate any piece with substituted parameters.
"""

from .bodies import ACTIVATIONS, MLP, AdaptiveTanh, ResNet, make_body
from .encoding import EpsEncoding
from .models import APNN, BGKAPNN, TransportAPNN, log_maxwellian, maxwellian_exp_derivatives
from .windows import TimeWindows

__all__ = ["ACTIVATIONS", "APNN", "AdaptiveTanh", "BGKAPNN", "EpsEncoding", "MLP", "ResNet", "TimeWindows", "TransportAPNN",
           "log_maxwellian", "make_body", "maxwellian_exp_derivatives"]
