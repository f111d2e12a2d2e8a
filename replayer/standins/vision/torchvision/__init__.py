"""Import-only stand-in for torchvision (the real PyPI wheel is a CUDA build that
cannot load against CPU torch). Nothing here works; it only lets sglang modules
that import torchvision at module level be imported."""

__version__ = "0.0.0+standin"
from . import io, transforms  # noqa: F401,E402
