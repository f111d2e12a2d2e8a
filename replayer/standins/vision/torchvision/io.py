from enum import Enum

from ._unavailable import unavailable


class ImageReadMode(Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4
    RGBA = RGB_ALPHA


decode_image = unavailable("torchvision.io.decode_image")
