import torch  # noqa: F401
from ._build import build_info, cuda_available
