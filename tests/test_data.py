"""Dataset sources, checksums and the prepared cache (robustfl/data/datasets.py)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustfl.data import datasets as data
from robustfl.data.datasets import (
    CIFAR10_CLASSES, CIFAR10_JPG_SHA256, DATASETS, KATHER_CLASSES, ArrayDataset, ChecksumError,
    DatasetSourceError, IncompleteCacheError, load_prepared, prepare, to_tensor,
)

CIFAR_MIRROR = Path(__file__).parents[1].parent / "shared/datasets/cifar10-jpg.tar.gz"


def md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ digits


def test_digits_loads(tmp_path: Path) -> None:
    ds = DATASETS.get("digits")({}, tmp_path)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape[1:] == (8, 8, 1)
    assert ds.y_train.dtype == np.int64
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert len(ds.y_test) == 359 and ds.meta["split"]["seed"] == 0
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    assert ds.classes == [str(i) for i in range(10)]
    # stratified: every class in both splits, roughly 20 % in test
    for k in range(10):
        n_te, n_tr = np.sum(ds.y_test == k), np.sum(ds.y_train == k)
        assert abs(n_te / (n_te + n_tr) - 0.2) < 0.01
    again = DATASETS.get("digits")({}, tmp_path)
    assert np.array_equal(again.x_test, ds.x_test)


def test_unknown_dataset_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known: .*cifar10.*digits.*fmnist.*imagefolder.*kather"):
        prepare("mnist", {}, tmp_path / "c")


def test_to_tensor() -> None:
    x = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    t = to_tensor(x, "cpu")
    assert tuple(t.shape) == (2, 3, 4, 5) and str(t.dtype) == "torch.float32"
    assert float(t[1, 2, 3, 4]) == pytest.approx(x[1, 3, 4, 2] / 255)
    ro = x.copy()
    ro.setflags(write=False)
    assert tuple(to_tensor(ro[0]).shape) == (3, 4, 5)
    with pytest.raises(ValueError):
        to_tensor(x.astype(np.float32))


# ------------------------------------------------------------------------------------------ fmnist


def _idx_images(a: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x00000803, *a.shape) + a.astype(np.uint8).tobytes()


def _idx_labels(a: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, len(a)) + a.astype(np.uint8).tobytes()


@pytest.fixture()
def fmnist_mirror(tmp_path: Path):
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 10, 30)),
              "t10k": (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12))}
    raw = tmp_path / "mirror" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    md5s = {}
    for split, (x, y) in arrays.items():
        for kind, blob in (("images-idx3", _idx_images(x)), ("labels-idx1", _idx_labels(y))):
            p = raw / f"{split}-{kind}-ubyte.gz"
            p.write_bytes(gzip.compress(blob))
            md5s[p.name] = md5(p)
    return tmp_path / "mirror", md5s, arrays


def test_fmnist_from_mirror_through_torchvision(fmnist_mirror, tmp_path: Path) -> None:
    mirror, md5s, arrays = fmnist_mirror
    ds = DATASETS.get("fmnist")({"mirror": str(mirror), "md5": md5s}, tmp_path / "raw")
    assert ds.x_train.shape == (30, 28, 28, 1) and ds.x_test.shape == (12, 28, 28, 1)
    assert np.array_equal(ds.x_train[..., 0], arrays["train"][0])
    assert np.array_equal(ds.y_test, arrays["t10k"][1])
    assert ds.classes[1] == "Trouser" and ds.classes[4] == "Coat" and ds.classes[3] == "Dress"
    assert ds.meta["checksums"]["train-images-idx3-ubyte.gz"]["md5"] == md5s["train-images-idx3-ubyte.gz"]
    assert not list((tmp_path / "raw").iterdir())  # the temporary extraction is gone


def test_fmnist_canonical_md5_mismatch_names_file(fmnist_mirror, tmp_path: Path) -> None:
    mirror, _, _ = fmnist_mirror
    with pytest.raises(ChecksumError) as e:  # default = canonical md5s: our generated files do not match
        DATASETS.get("fmnist")({"mirror": str(mirror)}, tmp_path / "raw")
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in msg
    assert "download" in msg and "mirror" in msg


def test_fmnist_truncated_file_fails_checksum(fmnist_mirror, tmp_path: Path) -> None:
    mirror, md5s, _ = fmnist_mirror
    p = mirror / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz.*expected md5 " + md5s[p.name]):
        DATASETS.get("fmnist")({"mirror": str(mirror), "md5": md5s}, tmp_path / "raw")


def test_fmnist_missing_file_named(fmnist_mirror, tmp_path: Path) -> None:
    mirror, md5s, _ = fmnist_mirror
    (mirror / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetSourceError, match="train-labels-idx1-ubyte.gz"):
        DATASETS.get("fmnist")({"mirror": str(mirror), "md5": md5s}, tmp_path / "raw")


def test_missing_mirror_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fmnist"
    for name in ("fmnist", "cifar10", "kather", "imagefolder"):
        with pytest.raises(DatasetSourceError, match=str(missing)):
            DATASETS.get(name)({"mirror": str(missing)}, tmp_path / "raw")


def test_no_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetSourceError, match="mirror.*download"):
        DATASETS.get("cifar10")({}, tmp_path / "raw")


def test_cifar10_bad_archive_checksum(tmp_path: Path) -> None:
    bogus = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(bogus, "w:gz") as tf:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ChecksumError, match=r"cifar-10-python\.tar\.gz.*c58f30108f718f92721af3b95e74349a"):
        DATASETS.get("cifar10")({"mirror": str(bogus)}, tmp_path / "raw")


# ------------------------------------------------------------------------------------------ kather


def _png(a: np.ndarray, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format=fmt)
    return b.getvalue()


@pytest.fixture()
def kather_zip(tmp_path: Path):
    rng = np.random.default_rng(1)
    p = tmp_path / "Kather_texture_2016_image_tiles_5000.zip"
    tiles = {}
    with zipfile.ZipFile(p, "w") as zf:
        for k, cname in enumerate(KATHER_CLASSES):
            for i in range(5):
                a = rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)
                fmt, ext = (("TIFF", "tif") if i % 2 == 0 else ("PNG", "png"))
                name = f"Kather_texture_2016_image_tiles_5000/{cname}/{i:04d}_tile.{ext}"
                zf.writestr(name, _png(a, fmt))
                tiles[(k, i)] = a
        zf.writestr("Kather_texture_2016_image_tiles_5000/Thumbs.db", b"junk")
    return p, tiles


def test_kather_from_small_zip(kather_zip, tmp_path: Path) -> None:
    p, tiles = kather_zip
    ds = DATASETS.get("kather")({"mirror": str(p), "sha256": sha256(p)}, tmp_path / "raw")
    assert ds.classes == KATHER_CLASSES and ds.num_classes == 8
    assert ds.x_train.shape == (32, 128, 128, 3) and ds.x_test.shape == (8, 128, 128, 3)
    assert np.array_equal(np.bincount(ds.y_test, minlength=8), np.ones(8))  # stratified 80/20
    assert ds.meta["split"] == {"method": "stratified per class, seeded permutation", "test_fraction": 0.2,
                                "seed": 0, "n_train": 32, "n_test": 8}
    # resizing is PIL bilinear 150 -> 128 of the tile
    want = np.asarray(Image.fromarray(tiles[(0, 0)]).resize((128, 128), Image.BILINEAR))
    hits = [np.array_equal(x, want) for x in np.concatenate([ds.x_train, ds.x_test])]
    assert sum(hits) == 1
    small = DATASETS.get("kather")({"mirror": str(p), "md5": md5(p), "size": 16}, tmp_path / "raw")
    assert small.x_train.shape[1:] == (16, 16, 3)
    assert np.array_equal(small.y_train, ds.y_train)


def test_kather_default_checksum_rejects_other_zip(kather_zip, tmp_path: Path) -> None:
    p, _ = kather_zip
    with pytest.raises(ChecksumError, match=f"{p.name}.*expected sha256 {data.KATHER_SHA256}"):
        DATASETS.get("kather")({"mirror": str(p)}, tmp_path / "raw")


# ------------------------------------------------------------------------------------------ imagefolder


def _imagefolder_tree(root: Path, grey: bool = False) -> dict:
    rng = np.random.default_rng(2)
    made = {}
    for split, n in (("train", 3), ("test", 2)):
        for cname in ("cat", "ant", "bee"):
            d = root / "pack" / split / cname
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (6, 7) if grey else (6, 7, 3), dtype=np.uint8)
                (d / f"{i:03d}.png").write_bytes(_png(a))
                made[(split, cname, i)] = a
    return made


def test_imagefolder_from_tar_gz(tmp_path: Path) -> None:
    made = _imagefolder_tree(tmp_path / "src")
    arc = tmp_path / "pack.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(tmp_path / "src" / "pack", arcname="pack")
    ds = DATASETS.get("imagefolder")({"mirror": str(arc), "sha256": sha256(arc), "name": "toy"}, tmp_path / "r")
    assert ds.name == "toy" and ds.classes == ["ant", "bee", "cat"]
    assert ds.x_train.shape == (9, 6, 7, 3) and ds.x_test.shape == (6, 6, 7, 3)
    assert np.array_equal(ds.y_train, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert np.array_equal(ds.x_train[3], made[("train", "bee", 0)])
    assert np.array_equal(ds.x_test[5], made[("test", "cat", 1)])
    with pytest.raises(ChecksumError, match="pack.tar.gz"):
        DATASETS.get("imagefolder")({"mirror": str(arc), "sha256": "0" * 64}, tmp_path / "r")


def test_imagefolder_zip_and_directory_grey(tmp_path: Path) -> None:
    _imagefolder_tree(tmp_path / "src", grey=True)
    d = DATASETS.get("imagefolder")({"mirror": str(tmp_path / "src")}, tmp_path / "r")
    assert d.x_train.shape == (9, 6, 7, 1)
    arc = tmp_path / "pack.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        for f in sorted((tmp_path / "src").rglob("*.png")):
            zf.write(f, f.relative_to(tmp_path / "src").as_posix())
    z = DATASETS.get("imagefolder")({"mirror": str(arc), "md5": md5(arc), "size": [4, 4], "channels": 3},
                                    tmp_path / "r")
    assert z.x_train.shape == (9, 4, 4, 3)
    assert np.array_equal(z.y_test, d.y_test)


# ------------------------------------------------------------------------------------------ prepare / cache


def test_prepare_load_round_trip(tmp_path: Path) -> None:
    out = prepare("digits", {}, tmp_path / "cache" / "digits")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["split"]["seed"] == 0
    assert meta["arrays"]["x_train"]["shape"] == [1438, 8, 8, 1]
    ds = load_prepared(out)
    assert isinstance(ds.x_train, np.memmap) and not ds.x_train.flags.writeable
    ref = DATASETS.get("digits")({}, tmp_path)
    for a in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(ds, a), getattr(ref, a))
    assert load_prepared(out, mmap=False, verify=True).x_test.flags.writeable
    # a second prepare with the same spec reuses the cache; force rebuilds it
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare("digits", {}, out) == out and (out / "meta.json").stat().st_mtime_ns == stamp
    prepare("digits", {}, out, force=True)
    assert (out / "meta.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "raw") == ["digits"]  # no temp dirs left


def test_interrupted_prepare_leaves_nothing_trusted(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "cache" / "digits"
    real_save = np.save
    calls = {"n": 0}

    def failing_save(f, arr, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real_save(f, arr, **kw)

    monkeypatch.setattr(data.np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        prepare("digits", {}, out)
    assert not (out / "meta.json").exists()
    with pytest.raises(IncompleteCacheError, match="meta.json"):
        load_prepared(out)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != "raw"] == []
    # an interruption while rebuilding leaves the previous complete cache untouched
    monkeypatch.setattr(data.np, "save", real_save)
    prepare("digits", {}, out)
    before = load_prepared(out, mmap=False).x_train.copy()
    calls["n"] = 0
    monkeypatch.setattr(data.np, "save", failing_save)
    with pytest.raises(OSError):
        prepare("digits", {}, out, force=True)
    assert np.array_equal(load_prepared(out).x_train, before)


def test_load_prepared_detects_mismatch(tmp_path: Path) -> None:
    out = prepare("digits", {}, tmp_path / "d")
    np.save(out / "y_test.npy", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="y_test"):
        load_prepared(out)


def test_array_dataset_validates() -> None:
    x = np.zeros((2, 3, 3, 1), np.uint8)
    with pytest.raises(ValueError, match="y_train"):
        ArrayDataset(x, np.zeros(2, np.int32), x, np.zeros(2, np.int64), ["a"], "t")
    with pytest.raises(ValueError, match="labels outside"):
        ArrayDataset(x, np.array([0, 1]), x, np.zeros(2, np.int64), ["a"], "t")


# ------------------------------------------------------------------------------------------ real CIFAR-10

needs_cifar = pytest.mark.skipif(not CIFAR_MIRROR.is_file(), reason=f"CIFAR-10 mirror {CIFAR_MIRROR} not present")


@needs_cifar
def test_real_cifar10_mirror_checksum_and_members() -> None:
    assert data.verify_file(CIFAR_MIRROR, sha256=CIFAR10_JPG_SHA256)["sha256"] == CIFAR10_JPG_SHA256
    seen = 0
    with tarfile.open(CIFAR_MIRROR, "r:gz") as tf:  # only the first few members: no full scan
        for m in tf:
            if not m.isfile():
                continue
            parts = m.name.split("/")
            assert parts[-3] in ("train", "test") and parts[-2] in CIFAR10_CLASSES and parts[-1].endswith(".jpg")
            im = Image.open(io.BytesIO(tf.extractfile(m).read()))
            assert im.size == (32, 32) and im.mode == "RGB"
            seen += 1
            if seen == 5:
                break
    assert seen == 5


@needs_cifar
@pytest.mark.slow
def test_real_cifar10_full_decode(tmp_path: Path) -> None:
    out = prepare("cifar10", {"mirror": str(CIFAR_MIRROR)}, tmp_path / "cifar10")
    ds = load_prepared(out)
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.classes == CIFAR10_CLASSES
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 5000))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert ds.meta["checksums"]["cifar10-jpg.tar.gz"]["sha256"] == CIFAR10_JPG_SHA256
