"""Contact sheets a person can check: image, soft map, mask overlay, ground truth."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .config import PreviewConfig
from .data.images import IMAGE_EXTENSIONS, decode_gray, decode_image
from .data.uris import (
    InputError,
    file_stem,
    full_uri,
    open_fs,
    pngs_by_stem,
    read_bytes_at,
    write_bytes_at,
)
from .evaluate import load_predictions
from .metrics import iou


def images_by_stem(uri: str, opts: dict) -> dict[str, str]:
    fs, root = open_fs(uri, opts)
    if not fs.exists(root):
        raise InputError(f"--images {uri!r} does not exist")
    found = (p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    return {file_stem(p): full_uri(fs, p) for p in found}


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1) :]


def contact_sheet(rows: list[tuple[str, list[tuple[np.ndarray, str]]]]):
    """(label, [(picture, column title), ...]) per row -> a matplotlib figure, a row per image.

    The row's label (image id, IoU) sits on a line of its own above the column
    titles, so a narrow (portrait) panel never puts two texts on top of each
    other; long ids keep their end.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 3 * len(rows)), squeeze=False)
    for ax_row, (label, panels) in zip(axes, rows, strict=True):
        for ax, (pic, title) in zip(ax_row, panels, strict=False):
            ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None)
            ax.set_axis_off()
            ax.set_title(title, fontsize=8)
        ax_row[0].annotate(
            _shorten(label, 34), xy=(0, 1), xycoords="axes fraction", xytext=(0, 14),
            textcoords="offset points", ha="left", va="bottom", fontsize=8,
        )  # fmt: skip
        for ax in ax_row[len(panels) :]:
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def render_sheet(cfg: PreviewConfig) -> dict:
    """Pick rows (first n, or the n worst by IoU), render them, save the PNG sheet."""
    opts = cfg.storage.options(cfg.predictions)
    preds = load_predictions(cfg.predictions, opts).to_pylist()
    images = images_by_stem(cfg.images, cfg.storage.options(cfg.images))
    gts = (
        pngs_by_stem(cfg.ground_truth, cfg.storage.options(cfg.ground_truth), "--ground-truth")
        if cfg.ground_truth
        else {}
    )

    def maps(row):
        if row["pred_uri"]:
            soft = decode_gray(read_bytes_at(row["pred_uri"], opts))
            return soft, soft >= 128
        return decode_gray(row["saliency_png"]), decode_gray(row["mask_png"]) > 127

    def gt_of(row, shape):
        g = decode_gray(read_bytes_at(gts[row["stem"]], cfg.storage.options(cfg.ground_truth)))
        return np.asarray(Image.fromarray(g).resize((shape[1], shape[0]), Image.NEAREST)) > 127

    rows = [r for r in preds if r["stem"] in images]
    if not rows:
        raise InputError("no prediction has an image of the same stem under --images")
    scores: dict[str, float] = {}
    if gts:
        for r in rows:
            if r["stem"] in gts:
                _, binary = maps(r)
                scores[r["stem"]] = iou(binary, gt_of(r, binary.shape))
    if cfg.worst:
        if not scores:
            raise InputError("--worst needs --ground-truth with masks matching the predictions")
        rows = sorted((r for r in rows if r["stem"] in scores), key=lambda r: scores[r["stem"]])
    rows = rows[: cfg.n]
    sheet = []
    for r in rows:
        soft, binary = maps(r)
        image = decode_image(
            read_bytes_at(images[r["stem"]], cfg.storage.options(cfg.images)), 10**9
        )
        image = np.asarray(Image.fromarray(image).resize((soft.shape[1], soft.shape[0])))
        overlay = image.astype(np.float32)
        overlay[binary] = 0.5 * overlay[binary] + 0.5 * np.array([255, 40, 40])
        panels = [(image, "image"), (soft, "soft map"), (overlay.astype(np.uint8), "mask")]
        if gts:
            panels.append(
                (gt_of(r, soft.shape) if r["stem"] in gts else np.zeros_like(soft), "ground truth")
            )
        label = r["image_id"] + (f"  IoU {scores[r['stem']]:.3f}" if r["stem"] in scores else "")
        sheet.append((label, panels))
    buf = io.BytesIO()
    fig = contact_sheet(sheet)
    import matplotlib.pyplot as plt

    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_bytes_at(cfg.output, buf.getvalue(), cfg.storage.options(cfg.output))
    return {"rows": len(rows), "output": cfg.output}
