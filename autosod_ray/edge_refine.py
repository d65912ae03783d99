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

The filter is written here in torch, float64, so that it runs where the model runs
(the actor's GPU, or its CPU): box means from running sums on a GPU (SciPy's
`uniform_filter` on a CPU, where it is faster), the per-window 3 x 3 ridge regression
solved in closed form. tests/test_autosod.py checks it against SciPy's box filter, a
per-window `numpy.linalg.solve` and the filter's defining property (a channel of the
guide given as the input comes back as it was), which OpenCV 5.0's float32
`ximgproc.guidedFilter` fails on natural images; tests/test_cuda.py checks the GPU
against the CPU. A registry names the refinements the jobs offer (`refine.method`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def mirror_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by `pad` each side, the edge mirrored with its
    edge sample repeated (d c b a | a b c d, SciPy's `reflect`)."""
    i = torch.arange(-pad, n + pad, device=device)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def running_box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """B x H x W x ... -> the mean over each (2 radius + 1)^2 window of H and W, per
    channel, the image's edge mirrored; O(1) per pixel from running sums, on any device."""
    k = 2 * radius + 1
    for dim in (1, 2):
        n = x.shape[dim]
        sums = x.index_select(dim, mirror_index(n, radius, x.device)).cumsum(dim)
        sums = torch.cat([torch.zeros_like(sums.narrow(dim, 0, 1)), sums], dim)
        x = (sums.narrow(dim, k, n) - sums.narrow(dim, 0, n)) / k
    return x


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """`running_box_mean`; on a CPU, SciPy's `uniform_filter` (the same means, two to
    three times faster there than torch's running sums)."""
    if x.device.type != "cpu":
        return running_box_mean(x, radius)
    from scipy.ndimage import uniform_filter

    size = (1, 2 * radius + 1, 2 * radius + 1) + (1,) * (x.ndim - 3)
    return torch.from_numpy(uniform_filter(x.numpy(), size=size, mode="reflect"))


def solve_3x3(m: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """... x 3 x 3 symmetric positive definite, ... x 3 -> ... x 3 solution (Cramer's rule:
    elementwise, so millions of tiny systems cost one pass on any device)."""
    c0, c1, c2 = m[..., 0], m[..., 1], m[..., 2]  # columns (= rows, symmetric)
    cross12 = torch.linalg.cross(c1, c2)
    det = (c0 * cross12).sum(-1, keepdim=True)
    x0 = (rhs * cross12).sum(-1, keepdim=True)
    x1 = (c0 * torch.linalg.cross(rhs, c2)).sum(-1, keepdim=True)
    x2 = (c0 * torch.linalg.cross(c1, rhs)).sum(-1, keepdim=True)
    return torch.cat([x0, x1, x2], -1) / det


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter: `src` (B x H x W) re-fit in every (2 radius + 1)^2 window
    as a linear function of the colour `guide` (B x H x W x 3 in [0, 1]); float64."""
    guide, src = guide.double(), src.double()
    mean_i, mean_p = box_mean(guide, radius), box_mean(src, radius)
    # per-window covariance of the colours (3 x 3) and of the colours with the mask (3)
    sigma = box_mean(guide[..., :, None] * guide[..., None, :], radius)
    sigma = sigma - mean_i[..., :, None] * mean_i[..., None, :]
    cov_ip = box_mean(guide * src[..., None], radius) - mean_i * mean_p[..., None]
    # the window's linear fit p = a . I + b (ridge regression, eps the ridge)
    eye = torch.eye(3, dtype=sigma.dtype, device=sigma.device)
    a = solve_3x3(sigma + eps * eye, cov_ip)
    b = mean_p - (a * mean_i).sum(-1)
    # every pixel averages the fits of the windows that hold it
    return (box_mean(a, radius) * guide).sum(-1) + box_mean(b, radius)


def guided(
    prob: np.ndarray, images: np.ndarray, radius: float, eps: float, device="cpu"
) -> np.ndarray:
    """B x h x w mask probability on a grid and the B x S x S x 3 uint8 images the grid
    was made of -> B x S x S probability whose edges follow the images' (in [0, 1]),
    computed on `device` one image at a time (a 448 px image is 200k parallel windows)."""
    size = images.shape[1]
    pixels = max(1, round(radius * size))
    out = np.empty((len(prob), size, size), np.float32)
    for i, (p, image) in enumerate(zip(prob, images, strict=True)):
        # copies (the batch's arrays may be read-only views of Ray's object store)
        grid = torch.tensor(p, dtype=torch.float32, device=device)[None, None]
        # the mask as the model put it: bilinear, as the unrefined mask is upsampled
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0]
        guide = torch.tensor(image, device=device)[None].double() / 255.0
        refined = guided_filter(guide, up, pixels, eps)  # edges onto the image's
        out[i] = refined[0].clamp(0.0, 1.0).float().cpu().numpy()
    return out


def unrefined(prob: np.ndarray, images: np.ndarray, **_) -> np.ndarray:
    """The grid's probability as it is (upsampled later, at each image's size)."""
    return prob


REFINEMENTS: dict[str, Callable[..., np.ndarray]] = {"guided": guided, "none": unrefined}


def refiner(section, device="cpu") -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A config's `refine` section -> (B x h x w probability, B x S x S x 3 images) -> map,
    computed on the torch `device` the model runs on."""
    fn = REFINEMENTS[section.method]
    return functools.partial(fn, radius=section.radius, eps=section.eps, device=device)
