"""Dataset sources, checksums and the uint8 ``.npy`` cache.

A source turns a config entry into an :class:`ArrayDataset` (uint8 NHWC images, int64 labels)::

    ds_dir = prepare("cifar10", {"mirror": "../shared/datasets/cifar10-jpg.tar.gz"}, "data/cache/cifar10")
    ds = load_prepared(ds_dir)              # memory-mapped, read-only
    x = to_tensor(ds.x_train[:64], "cuda")  # float32 NCHW in [0, 1]

Sources are registered in :data:`DATASETS` under their config name and called as
``fn(spec, raw_dir) -> ArrayDataset``; ``spec`` holds ``mirror`` (a local directory or archive, or
``None``) and ``download`` (bool) plus source-specific keys (checksum overrides, split settings).
Every input file is checked against a checksum *before* it is used; archives are read in place or
extracted into a fresh temporary directory, so a half-extracted tree is never trusted.
See ``docs/decisions/data.md`` for every choice made here.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustfl import registry as _registry
from robustfl.registry import Registry

log = logging.getLogger(__name__)

__all__ = [
    "ArrayDataset",
    "ChecksumError",
    "DATASETS",
    "DatasetSourceError",
    "IncompleteCacheError",
    "load_prepared",
    "prepare",
    "stratified_split",
    "to_tensor",
    "verify_file",
]

# --------------------------------------------------------------------------------------------------
# canonical sources and checksums
# --------------------------------------------------------------------------------------------------

#: torchvision's FashionMNIST resources (also listed in ../shared/datasets/README.md)
FMNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]

CIFAR10_TGZ = "cifar-10-python.tar.gz"
CIFAR10_TGZ_MD5 = "c58f30108f718f92721af3b95e74349a"
#: the JPEG ImageFolder re-encoding of all 60,000 CIFAR-10 images shipped in ../shared/datasets
CIFAR10_JPG = "cifar10-jpg.tar.gz"
CIFAR10_JPG_SHA256 = "d877bdec11f54282b92da36e9f045bd305d663b1223e3822baff39ca9ff6690a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

KATHER_URL = "https://zenodo.org/record/53169/files/Kather_texture_2016_image_tiles_5000.zip"
KATHER_ZIP = "Kather_texture_2016_image_tiles_5000.zip"
#: No md5 for the zip could be found offline; this sha256 (and size) is the one TensorFlow Datasets records
#: for the same Zenodo URL (tensorflow_datasets/url_checksums/colorectal_histology.txt). Overridable via
#: ``spec["sha256"]`` / ``spec["md5"]``; see docs/decisions/data.md.
KATHER_SHA256 = "936d0b95ae0f04f1f7b18a2b7e8c55776c3e887d102f645bcee752d1a6626a32"
KATHER_BYTES = 258_098_431
KATHER_CLASSES = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE",
                  "08_EMPTY"]
KATHER_SIZE = 128  # Appendix C: 150x150 tiles resized to 128x128
KATHER_TEST_FRACTION = 0.2
KATHER_SPLIT_SEED = 0

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".webp")

CACHE_FORMAT = 1
ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


class DatasetSourceError(RuntimeError):
    """A dataset source cannot be read (missing mirror, bad layout, failed download)."""


class ChecksumError(DatasetSourceError):
    """An input file does not have the expected digest."""


class IncompleteCacheError(FileNotFoundError):
    """A prepared-dataset directory is missing or was never completed (no ``meta.json``)."""


# --------------------------------------------------------------------------------------------------
# the array dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class ArrayDataset:
    """A whole dataset as arrays: images uint8 ``(N, H, W, C)``, labels int64 ``(N,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    name: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{self.name}: x_{split} must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"{self.name}: y_{split} must be int64 (N,) matching x_{split}, got "
                                 f"{y.dtype} {y.shape} for {len(x)} images")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(f"{self.name}: y_{split} has labels outside 0..{len(self.classes) - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                             f"{self.x_test.shape[1:]} differ in shape")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def to_tensor(x: np.ndarray, device: Any = "cpu"):
    """uint8 ``(N, H, W, C)`` (or one ``(H, W, C)`` image) -> float32 ``(N, C, H, W)`` in [0, 1] on ``device``.

    The uint8 array is moved first (4x fewer bytes over PCIe), then converted on the device.
    """
    import torch

    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"to_tensor expects uint8 images, got {x.dtype}")
    if x.ndim not in (3, 4):
        raise ValueError(f"to_tensor expects (N, H, W, C) or (H, W, C), got shape {x.shape}")
    if not x.flags.writeable or not x.flags.c_contiguous:  # read-only memmaps: torch wants writable memory
        x = np.array(x, copy=True, order="C")
    t = torch.from_numpy(x).to(device)
    t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous().to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------------


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None,
                hint: str = "") -> dict[str, str]:
    """Check ``path`` against the given digests (md5 through torchvision's ``check_integrity``).

    Returns the digests that were checked. Raises :class:`DatasetSourceError` if the file is missing and
    :class:`ChecksumError` (naming the file, expected and actual digest, and what to do) on a mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetSourceError(f"expected file {path} does not exist{': ' + hint if hint else ''}")
    todo = (hint + " ") if hint else ""
    advice = (f"{todo}The file is corrupt, truncated or not the expected version: delete it and download it "
              f"again (spec download: true), or point the spec's 'mirror' at a correct copy. If you use a "
              f"different file on purpose, pass its digest in the spec ('md5' / 'sha256').")
    checked: dict[str, str] = {}
    if md5 is not None:
        from torchvision.datasets.utils import calculate_md5, check_integrity

        if not check_integrity(str(path), md5):
            actual = calculate_md5(str(path))
            raise ChecksumError(f"checksum mismatch for {path}: expected md5 {md5}, got {actual}. {advice}")
        checked["md5"] = md5
    if sha256 is not None:
        actual = _sha256(path)
        if actual != sha256.lower():
            raise ChecksumError(f"checksum mismatch for {path}: expected sha256 {sha256}, got {actual}. {advice}")
        checked["sha256"] = actual
    return checked


# --------------------------------------------------------------------------------------------------
# helpers shared by the sources
# --------------------------------------------------------------------------------------------------


def _mirror_path(spec: dict[str, Any], name: str) -> Path | None:
    mirror = spec.get("mirror")
    if mirror in (None, ""):
        return None
    p = Path(mirror).expanduser()
    if not p.exists():
        raise DatasetSourceError(f"{name}: mirror path {p} (resolved: {p.absolute()}) does not exist; fix the "
                                 f"dataset's 'mirror' in the config or set download: true")
    return p


def _no_source(name: str) -> DatasetSourceError:
    return DatasetSourceError(f"{name}: no source given: set the dataset's 'mirror' to a local copy or "
                              f"'download: true' (canonical URL, checksum-verified)")


def _download(url: str, root: Path, filename: str, md5: str | None, name: str) -> Path:
    from torchvision.datasets.utils import download_url

    root.mkdir(parents=True, exist_ok=True)
    try:
        download_url(url, str(root), filename=filename, md5=md5)
    except Exception as e:  # URLError, OSError, RuntimeError("File not found or corrupted.")
        raise DatasetSourceError(f"{name}: downloading {url} into {root / filename} failed ({e}). Without network "
                                 f"access set the dataset's 'mirror' to a local copy instead") from e
    return root / filename


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded permutation; the first ``round(test_fraction * n_k)`` go to test.

    Returns sorted (train_idx, test_idx). Implemented here (not sklearn) so that it never changes with a
    library version.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _member_parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _iter_images(src: Path) -> Iterator[tuple[list[str], bytes]]:
    """Yield (path parts, file bytes) of every image file in a directory, .zip or tar archive.

    Archives are read in place (no extraction to disk); hidden files and ``__MACOSX`` are skipped.
    """
    def keep(parts: list[str]) -> bool:
        return (bool(parts) and parts[-1].lower().endswith(IMAGE_EXTS)
                and not any(p.startswith(".") or p == "__MACOSX" for p in parts))

    if src.is_dir():
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for f in sorted(files):
                p = Path(root, f)
                parts = list(p.relative_to(src).parts)
                if keep(parts):
                    yield parts, p.read_bytes()
    elif zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            for info in zf.infolist():
                parts = _member_parts(info.filename)
                if not info.is_dir() and keep(parts):
                    yield parts, zf.read(info)
    elif tarfile.is_tarfile(src):
        with tarfile.open(src, "r:*") as tf:
            for m in tf:
                parts = _member_parts(m.name)
                if m.isfile() and keep(parts):
                    f = tf.extractfile(m)
                    assert f is not None
                    yield parts, f.read()
    else:
        raise DatasetSourceError(f"{src} is neither a directory nor a .zip / tar archive")


def _decode(blobs: list[bytes], mode: str, size: tuple[int, int] | None, what: str) -> np.ndarray:
    """Decode image bytes with PIL to one uint8 (N, H, W, C) array (optionally resized, PIL bilinear)."""
    from PIL import Image

    def one(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
        return a[:, :, None] if a.ndim == 2 else a

    if not blobs:
        raise DatasetSourceError(f"{what}: no images found")
    first = one(blobs[0])
    out = np.empty((len(blobs), *first.shape), dtype=np.uint8)
    out[0] = first

    def fill(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            a = one(blobs[i])
            if a.shape != first.shape:
                raise DatasetSourceError(f"{what}: image {i} has shape {a.shape}, the first has {first.shape}; "
                                         f"give the spec a 'size: [H, W]' to resize all images")
            out[i] = a

    # PIL releases the GIL while decoding: a few threads, each on a contiguous chunk.
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(8, os.cpu_count() or 1))
    bounds = np.linspace(1, len(blobs), workers + 1).astype(int)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for fut in [ex.submit(fill, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
            fut.result()
    return out


def _read_imagefolder(src: Path, *, classes: list[str] | None, mode: str | None,
                      size: tuple[int, int] | None, what: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                                        list[str]]:
    """Read ``[prefix/]{train,test}/<class>/<file>``; returns {split: (x, y)} and the class list.

    Files are ordered by (class, file name); ``classes`` fixes the label order (default: sorted folder names).
    """
    found: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    for parts, blob in _iter_images(src):
        if len(parts) < 3 or parts[-3] not in found:
            continue
        found[parts[-3]].setdefault(parts[-2], []).append(("/".join(parts), blob))
    if not found["train"] or not found["test"]:
        raise DatasetSourceError(f"{what}: {src} must hold train/<class>/<image> and test/<class>/<image>; "
                                 f"found classes train={sorted(found['train'])} test={sorted(found['test'])}")
    names = sorted(found["train"])
    if classes is None:
        classes = names
    elif names != sorted(classes):
        raise DatasetSourceError(f"{what}: class folders {names} in {src} do not match the expected {classes}")
    if not set(found["test"]) <= set(classes):
        raise DatasetSourceError(f"{what}: test classes {sorted(set(found['test']) - set(classes))} in {src} "
                                 f"have no train folder")
    if mode is None:  # grey if every probed image is grey, else RGB
        from PIL import Image

        probe = [v[0][1] for d in found.values() for v in d.values()]
        modes = set()
        for b in probe:
            with Image.open(io.BytesIO(b)) as im:
                modes.add(im.mode)
        mode = "L" if modes <= {"L", "1", "I", "I;16"} else "RGB"
    out = {}
    for split, by_class in found.items():
        blobs, labels = [], []
        for k, cname in enumerate(classes):
            for _, blob in sorted(by_class.get(cname, [])):
                blobs.append(blob)
                labels.append(k)
        out[split] = (_decode(blobs, mode, size, f"{what} ({split})"), np.asarray(labels, dtype=np.int64))
    return out, list(classes)


def _archive_kind(path: Path) -> str:
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise DatasetSourceError(f"{path} is not a .zip or tar archive")


def _extract_tar_to(path: Path, dest: Path) -> None:
    with tarfile.open(path, "r:*") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tf.extractall(dest)


def _size(spec: dict[str, Any], default: int | None) -> tuple[int, int] | None:
    s = spec.get("size", default)
    if s is None:
        return None
    if isinstance(s, int):
        return (s, s)
    h, w = s
    return (int(h), int(w))


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------

if hasattr(_registry, "DATASETS"):  # the registry module may own it; otherwise it lives here
    DATASETS: Registry = _registry.DATASETS  # type: ignore[attr-defined]
else:
    DATASETS = Registry("dataset")


@DATASETS.register("digits")
def load_digits(spec: dict[str, Any], raw_dir: Path) -> ArrayDataset:
    """scikit-learn's embedded 8x8 digits (1,797 images): grey 0..16 -> uint8 0..255, stratified split."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    frac = float(spec.get("test_fraction", DIGITS_TEST_FRACTION))
    seed = int(spec.get("split_seed", DIGITS_SPLIT_SEED))
    tr, te = stratified_split(y, frac, seed)
    import sklearn

    return ArrayDataset(x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)], "digits", meta={
        "source": {"kind": "sklearn.datasets.load_digits", "sklearn": sklearn.__version__},
        "checksums": {"images_sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()},
        "split": {"method": "stratified per class, seeded permutation", "test_fraction": frac, "seed": seed,
                  "n_train": int(len(tr)), "n_test": int(len(te))},
        "scaling": "round(v * 255 / 16)",
    })


def _fmnist_files(mirror: Path) -> Path:
    for cand in (mirror / "FashionMNIST" / "raw", mirror / "raw", mirror):
        if cand.is_dir() and any((cand / f).exists() for f in FMNIST_MD5):
            return cand
    raise DatasetSourceError(f"fmnist: mirror {mirror} holds none of {sorted(FMNIST_MD5)} (looked in "
                             f"{mirror}/FashionMNIST/raw, {mirror}/raw and {mirror})")


load_digits.embedded = True  # type: ignore[attr-defined]  # ships with scikit-learn: needs no mirror/download


@DATASETS.register("fmnist")
def load_fmnist(spec: dict[str, Any], raw_dir: Path) -> ArrayDataset:
    """Fashion-MNIST through torchvision: the four idx ``.gz`` files, md5-checked, then ``FashionMNIST``."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    md5s = dict(FMNIST_MD5)
    override = spec.get("md5") or {}
    if not isinstance(override, dict) or not set(override) <= set(FMNIST_MD5):
        raise ValueError(f"fmnist: spec 'md5' must map some of {sorted(FMNIST_MD5)} to md5 digests, got {override!r}")
    md5s.update(override)
    mirror = _mirror_path(spec, "fmnist")
    if mirror is not None:
        src = _fmnist_files(mirror)
        kind = f"mirror {mirror}"
    elif spec.get("download"):
        src = Path(raw_dir) / "FashionMNIST" / "raw"
        for fname in FMNIST_MD5:
            _download(FashionMNIST.mirrors[0] + fname, src, fname, md5s[fname], "fmnist")
        kind = f"download {FashionMNIST.mirrors[0]}"
    else:
        raise _no_source("fmnist")
    checks = {}
    for fname in FMNIST_MD5:  # verify everything before anything is used
        checks[fname] = verify_file(src / fname, md5=md5s[fname],
                                    hint=f"fmnist needs {fname} in {src}.")["md5"]
    Path(raw_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fmnist-", dir=raw_dir) as tmp:
        raw = Path(tmp, "FashionMNIST", "raw")
        raw.mkdir(parents=True)
        for fname in FMNIST_MD5:
            extract_archive(str(src / fname), str(raw))  # .gz -> idx file (torchvision's own decompressor)
        try:
            tr = FashionMNIST(tmp, train=True, download=False)
            te = FashionMNIST(tmp, train=False, download=False)
        except Exception as e:
            raise DatasetSourceError(f"fmnist: torchvision could not parse the idx files from {src}: {e}") from e
        x_tr = tr.data.numpy().astype(np.uint8)[..., None]
        x_te = te.data.numpy().astype(np.uint8)[..., None]
        y_tr = tr.targets.numpy().astype(np.int64)
        y_te = te.targets.numpy().astype(np.int64)
    return ArrayDataset(x_tr, y_tr, x_te, y_te, list(FMNIST_CLASSES), "fmnist", meta={
        "source": {"kind": "torchvision.datasets.FashionMNIST", "from": kind},
        "checksums": {f: {"md5": v} for f, v in checks.items()},
        "split": {"method": "canonical train/test files"},
    })


def _cifar_from_batches(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import CIFAR10

    try:  # torchvision md5-checks every batch file
        tr = CIFAR10(str(root), train=True, download=False)
        te = CIFAR10(str(root), train=False, download=False)
    except RuntimeError as e:
        raise ChecksumError(f"cifar10: {root / CIFAR10.base_folder} is missing or corrupt ({e}); re-download "
                            f"{CIFAR10_TGZ} or fix the mirror path") from e
    return (np.asarray(tr.data, np.uint8), np.asarray(tr.targets, np.int64), np.asarray(te.data, np.uint8),
            np.asarray(te.targets, np.int64), list(tr.classes))


@DATASETS.register("cifar10")
def load_cifar10(spec: dict[str, Any], raw_dir: Path) -> ArrayDataset:
    """CIFAR-10: the canonical pickled batches (torchvision) or the JPEG ImageFolder mirror (sha256-checked)."""
    from torchvision.datasets import CIFAR10

    raw_dir = Path(raw_dir)
    mirror = _mirror_path(spec, "cifar10")
    if mirror is None:
        if not spec.get("download"):
            raise _no_source("cifar10")
        mirror = _download(CIFAR10.url, raw_dir, CIFAR10_TGZ, spec.get("md5") or CIFAR10_TGZ_MD5, "cifar10")
    if mirror.is_dir():
        if (mirror / CIFAR10.base_folder).is_dir():
            x_tr, y_tr, x_te, y_te, classes = _cifar_from_batches(mirror)
            return _cifar_ds(x_tr, y_tr, x_te, y_te, classes, {"kind": "torchvision.datasets.CIFAR10",
                                                               "from": str(mirror)},
                             {"batches": "md5 per batch (torchvision)"}, "canonical train/test batches")
        for fname in (CIFAR10_TGZ, CIFAR10_JPG):
            if (mirror / fname).is_file():
                mirror = mirror / fname
                break
        else:
            raise DatasetSourceError(f"cifar10: mirror directory {mirror} holds neither {CIFAR10.base_folder}/, "
                                     f"{CIFAR10_TGZ} nor {CIFAR10_JPG}")
    # an archive: accept the canonical tarball (md5) or the JPEG ImageFolder tarball (sha256)
    md5_ok = {CIFAR10_TGZ_MD5} | ({spec["md5"]} if spec.get("md5") else set())
    sha_ok = {CIFAR10_JPG_SHA256} | ({spec["sha256"].lower()} if spec.get("sha256") else set())
    from torchvision.datasets.utils import calculate_md5

    md5 = calculate_md5(str(mirror))
    sha = _sha256(mirror) if md5 not in md5_ok else None
    if md5 not in md5_ok and sha not in sha_ok:
        raise ChecksumError(
            f"checksum mismatch for {mirror}: expected the canonical {CIFAR10_TGZ} (md5 {CIFAR10_TGZ_MD5}) or the "
            f"JPEG ImageFolder {CIFAR10_JPG} (sha256 {CIFAR10_JPG_SHA256}); got md5 {md5}, sha256 {sha}. The file "
            f"is corrupt or truncated: re-download it (download: true) or fix the mirror path; if you use another "
            f"file on purpose, pass its digest as the spec's 'md5' / 'sha256'.")
    checks = {mirror.name: {"md5": md5} if sha is None else {"sha256": sha}}
    with tarfile.open(mirror, "r:*") as tf:
        first = next((m.name for m in tf if m.isfile()), "")
    if CIFAR10.base_folder in _member_parts(first):
        raw_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cifar10-", dir=raw_dir) as tmp:
            _extract_tar_to(mirror, Path(tmp))
            x_tr, y_tr, x_te, y_te, classes = _cifar_from_batches(Path(tmp))
        src = {"kind": "torchvision.datasets.CIFAR10", "from": str(mirror)}
        split = "canonical train/test batches"
    else:
        data, classes = _read_imagefolder(mirror, classes=list(CIFAR10_CLASSES), mode="RGB", size=(32, 32),
                                          what="cifar10")
        (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
        src = {"kind": "imagefolder (JPEG re-encoding of CIFAR-10)", "from": str(mirror),
               "order": "by class (canonical class order), then file name"}
        split = "the archive's train/ and test/ folders (= canonical split)"
    return _cifar_ds(x_tr, y_tr, x_te, y_te, classes, src, checks, split)


def _cifar_ds(x_tr, y_tr, x_te, y_te, classes, src, checks, split) -> ArrayDataset:
    if list(classes) != CIFAR10_CLASSES:
        raise DatasetSourceError(f"cifar10: classes {classes} are not the canonical {CIFAR10_CLASSES}")
    return ArrayDataset(x_tr, y_tr, x_te, y_te, list(CIFAR10_CLASSES), "cifar10",
                        meta={"source": src, "checksums": checks, "split": {"method": split}})


@DATASETS.register("kather")
def load_kather(spec: dict[str, Any], raw_dir: Path) -> ArrayDataset:
    """Kather 2016 colorectal histology tiles (Zenodo 53169): 8 classes, resized 150 -> 128 (PIL bilinear),
    seeded stratified 80/20 split."""
    raw_dir = Path(raw_dir)
    mirror = _mirror_path(spec, "kather")
    if mirror is None:
        if not spec.get("download"):
            raise _no_source("kather")
        mirror = _download(KATHER_URL, raw_dir, KATHER_ZIP, None, "kather")
    if mirror.is_dir() and (mirror / KATHER_ZIP).is_file():
        mirror = mirror / KATHER_ZIP
    md5, sha = spec.get("md5"), spec.get("sha256")
    if md5 is None and sha is None:
        sha = KATHER_SHA256
    if mirror.is_dir():
        checks: dict[str, Any] = {"note": f"directory {mirror}: no checksum possible"}
    else:
        checks = {mirror.name: verify_file(mirror, md5=md5, sha256=sha, hint=f"kather archive {mirror}.")}
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    pat = re.compile(r"^\d\d_[A-Z]+$")
    for parts, blob in _iter_images(mirror):
        if len(parts) >= 2 and pat.match(parts[-2]):
            by_class.setdefault(parts[-2], []).append(("/".join(parts), blob))
    if sorted(by_class) != KATHER_CLASSES:
        raise DatasetSourceError(f"kather: class folders {sorted(by_class)} in {mirror} are not the expected "
                                 f"{KATHER_CLASSES}")
    blobs, labels = [], []
    for k, cname in enumerate(KATHER_CLASSES):
        for _, blob in sorted(by_class[cname]):
            blobs.append(blob)
            labels.append(k)
    size = _size(spec, KATHER_SIZE)
    x = _decode(blobs, "RGB", size, "kather")
    y = np.asarray(labels, dtype=np.int64)
    frac = float(spec.get("test_fraction", KATHER_TEST_FRACTION))
    seed = int(spec.get("split_seed", KATHER_SPLIT_SEED))
    tr, te = stratified_split(y, frac, seed)
    return ArrayDataset(x[tr], y[tr], x[te], y[te], list(KATHER_CLASSES), "kather", meta={
        "source": {"kind": "Kather 2016 texture tiles (Zenodo 53169)", "from": str(mirror),
                   "order": "by class folder, then file name", "resize": f"PIL bilinear to {size}"},
        "checksums": checks,
        "split": {"method": "stratified per class, seeded permutation", "test_fraction": frac, "seed": seed,
                  "n_train": int(len(tr)), "n_test": int(len(te))},
    })


@DATASETS.register("imagefolder")
def load_imagefolder(spec: dict[str, Any], raw_dir: Path) -> ArrayDataset:
    """A generic archive (.tar.gz / .zip) or directory with ``train/<class>/*`` and ``test/<class>/*``.

    Spec keys: ``mirror`` (or ``url`` + ``download``), optional ``sha256`` / ``md5``, ``size`` ([H, W]),
    ``channels`` (1 or 3; default: 1 if every image is grey), ``classes`` (label order; default sorted), ``name``.
    """
    raw_dir = Path(raw_dir)
    mirror = _mirror_path(spec, "imagefolder")
    if mirror is None:
        if not (spec.get("download") and spec.get("url")):
            raise DatasetSourceError("imagefolder: set 'mirror' (a directory or archive), or 'url' and "
                                     "'download: true'")
        url = spec["url"]
        mirror = _download(url, raw_dir, url.rstrip("/").split("/")[-1].split("?")[0], spec.get("md5"),
                           "imagefolder")
    checks: dict[str, Any] = {}
    if mirror.is_file():
        checks[mirror.name] = verify_file(mirror, md5=spec.get("md5"), sha256=spec.get("sha256"),
                                          hint=f"imagefolder archive {mirror}.")
        if not checks[mirror.name]:
            checks[mirror.name] = {"sha256": _sha256(mirror), "verified": False}
        _archive_kind(mirror)
    ch = spec.get("channels")
    mode = None if ch is None else {1: "L", 3: "RGB"}[int(ch)]
    data, classes = _read_imagefolder(mirror, classes=spec.get("classes"), mode=mode, size=_size(spec, None),
                                      what="imagefolder")
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    return ArrayDataset(x_tr, y_tr, x_te, y_te, classes, str(spec.get("name", "imagefolder")), meta={
        "source": {"kind": "imagefolder", "from": str(mirror), "order": "by class, then file name"},
        "checksums": checks, "split": {"method": "the source's train/ and test/ folders"},
    })


# --------------------------------------------------------------------------------------------------
# the cache: prepare once, memory-map afterwards
# --------------------------------------------------------------------------------------------------


def _fingerprint(name: str, spec: dict[str, Any]) -> str:
    s = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in spec.items() if k not in ("download",)}
    return hashlib.sha256(json.dumps({"name": name, "spec": s}, sort_keys=True, default=str).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def prepare(name: str, spec: dict[str, Any] | None, out_dir: str | os.PathLike, *,
            raw_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Decode dataset ``name`` once into ``out_dir/{x_train,y_train,x_test,y_test}.npy`` + ``meta.json``.

    The arrays and ``meta.json`` are written into a temporary sibling directory which then replaces
    ``out_dir`` as a whole, so ``out_dir`` either holds a complete cache (``meta.json`` last) or nothing.
    A complete cache built from the same name and spec is reused unless ``force``. Downloads and temporary
    extractions go to ``raw_dir`` (default: ``<out_dir's parent>/raw/<name>``).
    """
    spec = dict(spec or {})
    fn = DATASETS.get(name)  # unknown name -> ValueError listing the known ones
    out_dir = Path(out_dir)
    fp = _fingerprint(name, spec)
    if not force and (out_dir / "meta.json").is_file():
        try:
            old = json.loads((out_dir / "meta.json").read_text())
            if old.get("spec_fingerprint") == fp and old.get("format") == CACHE_FORMAT:
                return out_dir
            log.info("rebuilding %s: it was prepared from a different spec", out_dir)
        except (OSError, ValueError):
            pass
    raw = Path(raw_dir) if raw_dir is not None else out_dir.parent / "raw" / name  # created by sources as needed
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ds = fn(spec, raw)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        files = {}
        for a in ARRAY_NAMES:
            arr = np.ascontiguousarray(getattr(ds, a))
            p = tmp / f"{a}.npy"
            with open(p, "wb") as f:
                np.save(f, arr, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files[a] = {"file": p.name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                        "bytes": p.stat().st_size, "sha256": _sha256(p)}
        from importlib.metadata import PackageNotFoundError, version

        try:
            tv_version = version("torchvision")
        except PackageNotFoundError:  # pragma: no cover
            tv_version = None
        meta = {
            "format": CACHE_FORMAT,
            "name": ds.name,
            "config_name": name,
            "classes": list(ds.classes),
            "image_shape": list(ds.image_shape),
            "n_train": int(len(ds.y_train)),
            "n_test": int(len(ds.y_test)),
            "class_counts": {"train": np.bincount(ds.y_train, minlength=ds.num_classes).tolist(),
                             "test": np.bincount(ds.y_test, minlength=ds.num_classes).tolist()},
            "arrays": files,
            "spec": {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in spec.items()},
            "spec_fingerprint": fp,
            "versions": {"numpy": np.__version__, "torchvision": tv_version},
            "prepare_seconds": round(time.time() - t0, 3),
            **ds.meta,
        }
        mp = tmp / "meta.json"  # the completion marker: written last
        with open(mp, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old_dir = None
        if out_dir.exists() or out_dir.is_symlink():
            old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old_dir / "d")
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_prepared(out_dir: str | os.PathLike, mmap: bool = True, verify: bool = False) -> ArrayDataset:
    """Open a cache written by :func:`prepare` (memory-mapped read-only unless ``mmap=False``).

    Raises :class:`IncompleteCacheError` if ``meta.json`` is missing (never prepared, or interrupted), and
    ``ValueError`` if an array disagrees with ``meta.json`` (with ``verify``, also its sha256).
    """
    out_dir = Path(out_dir)
    mp = out_dir / "meta.json"
    if not mp.is_file():
        raise IncompleteCacheError(f"{out_dir} is not a complete prepared dataset: {mp} is missing (never "
                                   f"prepared, or an interrupted prepare). Run robustfl.data.datasets.prepare again.")
    meta = json.loads(mp.read_text())
    arrays = {}
    for a in ARRAY_NAMES:
        info = meta["arrays"][a]
        p = out_dir / info["file"]
        if verify and _sha256(p) != info["sha256"]:
            raise ValueError(f"{p}: sha256 differs from {mp}; the cache is corrupt, run prepare(force=True)")
        arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
            raise ValueError(f"{p}: {arr.dtype} {arr.shape} but {mp} says {info['dtype']} {info['shape']}; "
                             f"run prepare(force=True)")
        arrays[a] = arr
    return ArrayDataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                        list(meta["classes"]), meta["name"], meta=meta)
