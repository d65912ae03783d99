"""Pipeline stages on real batches: retries, error kinds, and out-of-memory splitting."""

import io

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from autosod_ray.data import stages
from autosod_ray.data.stages import INTERNAL, PERMANENT, TRANSIENT, ModelStage, decode, read_bytes


class FlakyFS(MemoryFileSystem):
    """An in-memory object store whose reads fail (ConnectionError) the first
    `failures[path]` times: a throttled or dropped GET."""

    protocol = "flaky"
    failures: dict[str, int] = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        if self.failures.get(path, 0) > 0:
            self.failures[path] -= 1
            raise ConnectionError(f"connection reset reading {path}")
        return super().cat_file(path, start, end, **kwargs)


@pytest.fixture()
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(stages.time, "sleep", lambda s: None)  # no real back-off in tests
    fs = FlakyFS()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    for name in ("a.png", "b.png", "c.png"):
        fs.pipe_file(f"/imgs/{name}", buf.getvalue())
    FlakyFS.failures = {"/imgs/a.png": 2, "/imgs/b.png": 99}  # a: recovers; b: never does
    yield fs
    FlakyFS.failures = {}
    fs.rm("/imgs", recursive=True)


def test_reads_are_retried_and_failures_get_their_kind(flaky):
    uris = ["flaky:///imgs/a.png", "flaky:///imgs/b.png", "flaky:///imgs/gone.png"]
    batch = {"image_id": np.array(["a", "b", "gone"], object), "source_uri": np.array(uris, object)}
    out = read_bytes(batch, {})
    assert out["error"][0] == "" and len(out["data"][0]) > 0  # two failures, then read
    assert "after 4 tries" in out["error"][1] and out["error_kind"][1] == TRANSIENT
    assert out["error_kind"][2] == PERMANENT and "FileNotFoundError" in out["error"][2]
    decoded = decode(out, image_size=28, max_pixels=10**6, min_side=14)
    assert list(decoded["error_kind"]) == ["", TRANSIENT, PERMANENT]
    junk = {**out, "data": np.array([b"not an image", b"", b""], object)}
    assert decode(junk, 28, 10**6, 14)["error_kind"][0] == PERMANENT  # undecodable: stays


class SmallDevice:
    """A model with room for at most 2 images per call, and one image (all 255) it
    always fails on."""

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        self.calls.append(len(images))
        if len(images) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if (images == 255).all(axis=(1, 2, 3)).any():
            raise ValueError("NaN in the features")
        sal = images[..., 0].astype(np.float32)[:, ::4, ::4] / 255
        return sal, {"quality": np.full(len(images), 0.5, np.float32)}


def test_a_batch_too_big_is_split_and_only_the_bad_image_fails():
    n = 7
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[:, :4] = 100
    images[5] = 255  # the one the model cannot label
    batch = {
        "image_id": np.array([f"i{k}" for k in range(n)], object),
        "image": images,
        "error": np.array([""] * (n - 1) + ["corrupt"], object),
        "error_kind": np.array([""] * (n - 1) + [PERMANENT], object),
    }
    model = SmallDevice()
    out = ModelStage(lambda: model)(batch)
    assert list(out["error"][:5]) == [""] * 5 and out["error"][6] == "corrupt"
    assert "labelling failed: ValueError: NaN" in out["error"][5]
    # a model exception on a valid image is ours (a bug): internal, not the input's fault
    assert out["error_kind"][5] == INTERNAL and out["error_kind"][6] == PERMANENT
    assert out["saliency"].shape == (n, 2, 2) and np.allclose(out["saliency"][:5, 0], 100 / 255)
    assert np.allclose(out["quality"][:5], 0.5) and np.isnan(out["quality"][5:]).all()
    assert model.calls[0] == 6 and max(model.calls[1:]) <= 3  # split, never re-sent whole

    # a single image that does not fit even alone: an out-of-memory error, transient
    def no_room(images):
        raise MemoryError()

    one = {"image_id": batch["image_id"][:1], "image": images[:1]}
    one = ModelStage(lambda: no_room)(
        {**one, "error": np.array([""], object), "error_kind": np.array([""], object)}
    )
    assert one["error"][0].startswith("out of memory") and one["error_kind"][0] == TRANSIENT


def test_a_mask_that_comes_out_empty_at_the_image_size_scores_quality_zero():
    """A few pixels above the threshold on the model's grid can vanish when the map is
    resized to the image: the row written has an empty mask and quality 0, exactly;
    the others keep theirs (a failed row stays as it was)."""
    from autosod_ray.model.inference import threshold_at_size

    speck = np.zeros((32, 32), np.float32)
    speck[5, 5] = 0.6  # above 0.5 on the grid, averaged away at 16 x 16
    block = np.zeros((32, 32), np.float32)
    block[8:24, 8:24] = 0.9
    batch = {
        "image_id": np.array(["speck", "block", "bad"], object),
        "saliency": np.stack([speck, block, block]),
        "height": np.array([16, 16, 16]),
        "width": np.array([16, 16, 16]),
        "error": np.array(["", "", "corrupt"], object),
        "quality": np.array([0.3, 0.7, np.nan], np.float32),
    }
    assert threshold_at_size(speck, 32, 32, 0.5)[1].any()  # not empty on its own grid
    to_masks = lambda s, h, w: threshold_at_size(s, h, w, 0.5)  # noqa: E731
    out = stages.encode(batch, to_masks, "m", "h")
    assert out["fg_fraction"][0] == 0 and out["fg_fraction"][1] > 0
    assert out["quality"][0] == 0.0 and out["quality"][1] == pytest.approx(0.7)
    assert np.isnan(out["quality"][2])
