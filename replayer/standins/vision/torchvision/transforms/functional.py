from .._unavailable import unavailable
from . import InterpolationMode  # noqa: F401

pil_to_tensor = unavailable("torchvision.transforms.functional.pil_to_tensor")
