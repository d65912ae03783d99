"""Step 6: the confidence-weighted consistency loss refines the prototype CAMs.

L_con = mean_i omega_i |A_fg(i) - S_fg(i)| compares the re-weighted prototype
class map A_fg (step 5) with the seed CAM S_fg (step 1), each pixel weighted by
the transport's confidence omega_i. As in prototypical OT for segmentation,
both maps take part: a few batched gradient steps move the prototypes z'_ck
(hence the prototype CAMs) and the classifier w_fg toward agreement where the
transport is sure; OT masses and omega stay fixed. The refined class map is the
saliency. torch autograd on the features' device (zero-copy through DLPack).
"""

from __future__ import annotations

from dataclasses import dataclass

from .backend import array_namespace


@dataclass
class Refined:
    saliency: object  # B x N: the class map of the refined prototypes
    cam: object  # B x N: S_fg of the refined classifier
    loss: object  # B: L_con after the last step


def _torch(x):
    import torch

    return torch.from_dlpack(array_namespace(x).ascontiguousarray(x))


def _back(t, like):
    return array_namespace(like).from_dlpack(t.detach().contiguous())


def torch_class_map(f, z, log_mass, k: int, temperature: float, foreground=None):
    """torch twin of `reweighted_class_maps`' saliency: softmax over prototypes of
    cos(z_j, f_i) / t + log gamma_j, summed over the foreground's k (or the
    B x P `foreground` membership). B x N."""
    import torch.nn.functional as F

    logits = f @ F.normalize(z, dim=-1).transpose(1, 2) / temperature + log_mass[:, None, :]
    share = logits.softmax(-1)
    return share[:, :, :k].sum(-1) if foreground is None else (share * foreground[:, None]).sum(-1)


def torch_cam(f, w):
    """torch twin of step 1's S_fg = minmax(ReLU(cos(w_fg, f_i))). B x N."""
    import torch.nn.functional as F

    s = (f @ F.normalize(w, dim=-1)[:, :, None])[..., 0].relu()
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    return (s - lo) / (hi - lo + 1e-8)


def refine_by_consistency(
    features, w_fg, prototypes, mass, confidence, k: int, steps: int, lr: float, temperature: float,
    foreground=None,
) -> Refined:  # fmt: skip
    """features B x N x D, w_fg B x D, prototypes z' B x P x D, mass gamma B x P,
    confidence omega B x N -> the refined class map, CAM and L_con (numpy or cupy).
    `foreground` (B x P): which prototypes make the class map (default: the first k)."""
    import torch

    f, omega = _torch(features), _torch(confidence)
    fg = None if foreground is None else _torch(foreground)
    log_mass = _torch(mass).clamp_min(1e-12).log()
    z = _torch(prototypes).clone().requires_grad_(True)
    w = _torch(w_fg).clone().requires_grad_(True)
    opt = torch.optim.SGD([z, w], lr=lr)

    def l_con():
        a = torch_class_map(f, z, log_mass, k, temperature, fg)
        s = torch_cam(f, w)
        # L_con = mean_i omega_i |A_fg(i) - S_fg(i)|, per image
        return a, s, (omega * (a - s).abs()).mean(-1)

    with torch.enable_grad():
        for _ in range(steps):
            _, _, loss = l_con()
            opt.zero_grad()
            loss.sum().backward()  # images are independent: one backward for the batch
            opt.step()
    with torch.no_grad():
        a, s, loss = l_con()
    return Refined(saliency=_back(a, features), cam=_back(s, features), loss=_back(loss, features))
