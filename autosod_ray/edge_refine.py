"""Edge-aware refinement of a mask: its edges moved onto the image's edges.

A mask made on a grid coarser than the image (AutoSOD's 64 x 64 for a 448 px input,
four cells per patch; POTNet's 32 x 32 patches) and upsampled bilinearly keeps each
edge where a grid cell put it: up to half a cell off the object's real outline. The
guided filter (He, Sun and Tang, "Guided Image Filtering", 2010) re-fits the
upsampled probability, in every window of the image, as a linear function of the
pixels' colours: where the colour changes at the object's outline, so does the
fitted mask. Windows reach `radius` (a share of the input side; 1/32 is two of
AutoSOD's cells, one of POTNet's) each way, the distance an edge may be off;
`eps` is the colour variance below which a window counts as flat and keeps its
mean instead.

The filter is written here, in float64 with SciPy's box means: OpenCV 5.0's
`ximgproc.guidedFilter` (float32) does not reproduce a channel of a natural image's
own colours used as the input (tests/test_autosod.py checks ours does, which is the
filter's defining property). A registry names the refinements the jobs offer
(`refine.method`; `guided` is both labelling jobs' default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from PIL import Image


def upsample_square(prob: np.ndarray, size: int) -> np.ndarray:
    """h x w probability -> size x size, bilinear (as the mask's own upsampling)."""
    return np.asarray(Image.fromarray(prob.astype(np.float32)).resize((size, size), Image.BILINEAR))


def box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over each (2 radius + 1)^2 window, per channel (the image's edge mirrored)."""
    from scipy.ndimage import uniform_filter

    size = (2 * radius + 1, 2 * radius + 1) + (1,) * (x.ndim - 2)
    return uniform_filter(x, size=size, mode="reflect")


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter: `src` (H x W) re-fit in every (2 radius + 1)^2 window as
    a linear function of the colour `guide` (H x W x 3 in [0, 1]); float64 throughout."""
    guide, src = guide.astype(np.float64), src.astype(np.float64)
    mean_i, mean_p = box_mean(guide, radius), box_mean(src, radius)
    # per-window covariance of the colours (3 x 3) and of the colours with the mask (3)
    sigma = box_mean(guide[..., :, None] * guide[..., None, :], radius)
    sigma -= mean_i[..., :, None] * mean_i[..., None, :]
    cov_ip = box_mean(guide * src[..., None], radius) - mean_i * mean_p[..., None]
    # the window's linear fit p = a . I + b (ridge regression, eps the ridge)
    a = np.linalg.solve(sigma + eps * np.eye(3), cov_ip[..., None])[..., 0]
    b = mean_p - (a * mean_i).sum(-1)
    # every pixel averages the fits of the windows that hold it
    return (box_mean(a, radius) * guide).sum(-1) + box_mean(b, radius)


def guided(prob: np.ndarray, images: np.ndarray, radius: float, eps: float) -> np.ndarray:
    """B x h x w mask probability on a grid and the B x S x S x 3 uint8 images the grid
    was made of -> B x S x S probability whose edges follow the images' (in [0, 1])."""
    size = images.shape[1]
    pixels = max(1, round(radius * size))
    out = np.empty((len(prob), size, size), np.float32)
    for i, (p, image) in enumerate(zip(prob, images, strict=True)):
        up = upsample_square(p, size)  # the mask as the model put it
        out[i] = guided_filter(image / 255.0, up, pixels, eps)  # edges onto the image's
    return np.clip(out, 0.0, 1.0)


def unrefined(prob: np.ndarray, images: np.ndarray, **_) -> np.ndarray:
    """The grid's probability as it is (upsampled later, at each image's size)."""
    return prob


REFINEMENTS: dict[str, Callable[..., np.ndarray]] = {"guided": guided, "none": unrefined}


def refiner(section) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A config's `refine` section -> (B x h x w probability, B x S x S x 3 images) -> map."""
    return functools.partial(REFINEMENTS[section.method], radius=section.radius, eps=section.eps)
