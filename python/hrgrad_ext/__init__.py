import torch  # noqa: F401
from ._build import build_info, cuda_available
from . import ops  # noqa: E402,F401  (registers fake kernels and autograd formulas)
