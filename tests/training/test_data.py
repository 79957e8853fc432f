"""nasloc.training.data on tiny real data: the embedded digits, and ImageFolder / CIFAR-pickle trees made in
tmp_path."""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nasloc.training.data import DataError, LazyImageDataset, TensorImageDataset, load_dataset, stratified_split
from nasloc.training.loader import make_loader, weak_augment


def _write_image(path: Path, value: int, size: int = 8) -> None:
    """A flat image whose grey level identifies it after decoding (PNG is lossless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _image_tree(root: Path, classes: dict[str, int], size: int = 8) -> None:
    """root/<class>/<nnnn>.png, n (< 50) images per class, grey level 50 * class index + image index."""
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            _write_image(root / name / f"{i:04d}.png", 50 * c + i, size)


# ------------------------------------------------------------------------------------------- digits


def test_digits_loads_as_uint8_tensors_without_flip():
    splits = load_dataset("digits", None, img_size=16)
    assert isinstance(splits.train, TensorImageDataset)
    assert len(splits.train) + len(splits.val) == 1797
    assert splits.train.images.shape[1:] == (3, 16, 16) and splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.train.images[:, 0], splits.train.images[:, 2])  # grey replicated to RGB
    assert splits.num_classes == 10 and splits.class_names == [str(i) for i in range(10)]
    assert splits.img_size == 16 and splits.test is None
    assert not splits.train.hflip  # a mirrored digit is a different glyph
    assert all(0.1 < m < 0.6 for m in splits.mean) and all(0.1 < s < 0.6 for s in splits.std)
    image, label = splits.val[0]
    assert image.shape == (3, 16, 16) and isinstance(label, int)


def test_digits_split_is_deterministic_stratified_and_disjoint():
    a = load_dataset("digits", None, img_size=8, seed=3)
    b = load_dataset("digits", None, img_size=8, seed=3)
    c = load_dataset("digits", None, img_size=8, seed=4)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    counts = torch.bincount(a.val.labels, minlength=10)
    assert counts.min() >= 17 and counts.max() <= 19  # ~10% of each class's ~180 images
    # At 8 px the images are the raw digits: train and val together are exactly the whole set, once.
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(np.round(load_digits().images * 255 / 16)).to(torch.uint8).flatten(1)
    both = torch.cat([a.train.images[:, 0], a.val.images[:, 0]]).flatten(1)
    assert np.array_equal(_sorted_rows(both), _sorted_rows(raw))


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    rows = x.numpy()
    return rows[np.lexsort(rows.T[::-1])]


def test_stratified_split_properties():
    labels = np.repeat(np.arange(4), [50, 20, 7, 1])
    train, val = stratified_split(labels, 0.2, "random", seed=0)
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).tolist() == list(range(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [10, 4, 1, 0]  # a lone image stays in train
    again = stratified_split(labels, 0.2, "random", seed=0)
    assert all(np.array_equal(x, y) for x, y in zip((train, val), again))
    assert not np.array_equal(val, stratified_split(labels, 0.2, "random", seed=1)[1])
    _, tail = stratified_split(labels, 0.2, "tail")
    assert tail.tolist() == [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 66, 67, 68, 69, 76]
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0)


# ------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_tail_split_takes_the_last_files_of_each_class(tmp_path):
    _image_tree(tmp_path / "train", {"cat": 10, "dog": 10})
    splits = load_dataset("imagefolder", tmp_path, img_size=8, split="tail", val_fraction=0.2)
    assert splits.class_names == ["cat", "dog"] and isinstance(splits.train, TensorImageDataset)
    val_ids = sorted(int(img[0, 0, 0]) for img, _ in splits.val)
    assert val_ids == [8, 9, 58, 59]  # files 0008, 0009 of each class
    assert len(splits.train) == 16 and not {int(img[0, 0, 0]) for img, _ in splits.train} & set(val_ids)


def test_imagefolder_random_split_is_seeded(tmp_path):
    _image_tree(tmp_path, {"a": 20, "b": 20})  # no train/ subfolder: the root holds the classes

    def val_ids(seed):
        return sorted(int(img[0, 0, 0]) for img, _ in load_dataset("imagefolder", tmp_path, 8, seed=seed).val)

    assert val_ids(0) == val_ids(0) and val_ids(0) != val_ids(1)
    assert sum(v < 50 for v in val_ids(0)) == 2  # 2 of class a, 2 of class b


def test_corrupt_files_are_skipped_with_one_warning(tmp_path):
    _image_tree(tmp_path, {"a": 5, "b": 5})
    (tmp_path / "a" / "0100.jpg").write_bytes(b"not an image")
    (tmp_path / "b" / "0100.png").write_bytes((tmp_path / "b" / "0000.png").read_bytes()[:40])  # truncated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_dataset("imagefolder", tmp_path, img_size=8, val_fraction=0.2)
    assert len(splits.train) + len(splits.val) == 10
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"skipped 2 unreadable images under {tmp_path} (first: ")
    assert "0100.jpg" in messages[0]


@pytest.mark.parametrize("layout, expected", [
    ("missing", "folder not found"),
    ("empty", "is empty"),
    ("files_only", "no class subfolders"),
    ("empty_class", "class folder has no images"),
])
def test_bad_imagefolder_trees_raise_one_line_errors(tmp_path, layout, expected):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "files_only":
        _write_image(root / "0000.png", 1)
    if layout == "empty_class":
        _image_tree(root, {"a": 2})
        (root / "b").mkdir()
    with pytest.raises(DataError, match=expected) as err:
        load_dataset("imagefolder", root, img_size=8)
    assert "\n" not in str(err.value) and str(root) in str(err.value)


def test_train_val_test_subfolders_are_used(tmp_path):
    _image_tree(tmp_path / "train", {"a": 4, "b": 4})
    _image_tree(tmp_path / "val", {"a": 2, "b": 1})
    _image_tree(tmp_path / "test", {"b": 3})
    splits = load_dataset("imagefolder", tmp_path, img_size=8, with_test=True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 3, 3)
    assert splits.test.labels.tolist() == [1, 1, 1]  # class indices follow train/
    assert load_dataset("imagefolder", tmp_path, img_size=8).test is None  # search never sees test
    _image_tree(tmp_path / "val", {"zebra": 1})
    with pytest.raises(DataError, match="classes not in train/: zebra"):
        load_dataset("imagefolder", tmp_path, img_size=8)


def _tiny_imagenet_tree(root: Path) -> None:
    """Tiny-ImageNet's layout: train/<wnid>/images/*, val/images/* with val_annotations.txt, unlabelled test/images/*."""
    for c, wnid in enumerate(("n01", "n02")):
        for i in range(3):
            _write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 50 * c + i)
    rows = []
    for i, wnid in enumerate(("n02", "n01", "n02")):
        _write_image(root / "val" / "images" / f"val_{i}.JPEG", 200 + i)
        rows.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    for i in range(2):
        _write_image(root / "test" / "images" / f"test_{i}.JPEG", 100 + i)


def test_tiny_imagenet_layout_reads_val_annotations_and_has_no_test_split(tmp_path):
    _tiny_imagenet_tree(tmp_path)
    splits = load_dataset("imagefolder", tmp_path, img_size=8, with_test=True)
    assert splits.class_names == ["n01", "n02"]
    assert (len(splits.train), len(splits.val)) == (6, 3)
    assert splits.val.labels.tolist() == [1, 0, 1]
    assert splits.test is None  # test/images/ carries no labels


def test_a_val_annotation_line_without_a_tab_names_its_line(tmp_path):
    _tiny_imagenet_tree(tmp_path)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\nval_1.JPEG n01\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:2: want '<file><TAB><class>'") as err:
        load_dataset("imagefolder", tmp_path, img_size=8)
    assert "\n" not in str(err.value)


def test_a_val_tree_without_images_is_refused(tmp_path):
    _image_tree(tmp_path / "train", {"a": 4, "b": 4})
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in its class folders"):
        load_dataset("imagefolder", tmp_path, img_size=8)


def test_large_images_are_decoded_lazily(tmp_path):
    _image_tree(tmp_path, {"a": 3, "b": 3}, size=80)
    (tmp_path / "a" / "0001.png").write_bytes(b"broken")
    splits = load_dataset("imagefolder", tmp_path, img_size=16, val_fraction=0.34)
    assert isinstance(splits.train, LazyImageDataset)
    assert splits.mean == (0.485, 0.456, 0.406)  # ImageNet statistics: no pass over large files
    image, label = splits.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    bad = str(tmp_path / "a" / "0001.png")
    dataset = splits.train if bad in splits.train.files else splits.val
    with pytest.warns(UserWarning, match="cannot decode .*0001.png"):
        image, _ = dataset[dataset.files.index(bad)]  # replaced by the next readable image
    assert image.shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------- cifar


def _cifar10_tree(root: Path, per_batch: int = 6) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [i % 3 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"plane", b"car", b"bird"]}))


def test_cifar10_pickles(tmp_path):
    _cifar10_tree(tmp_path)
    splits = load_dataset("cifar10", tmp_path, img_size=32, with_test=True, val_fraction=0.2)
    assert splits.class_names == ["plane", "car", "bird"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 6)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())[b"data"]
    assert torch.equal(splits.test.images[0], torch.from_numpy(raw[0].reshape(3, 32, 32)))  # CHW order
    small = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", img_size=16)
    assert small.train.images.shape[1:] == (3, 16, 16)


def test_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 20), ("test", 4)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 2 for i in range(n)]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple", b"bee"]}))
    splits = load_dataset("cifar100", tmp_path, img_size=32, with_test=True)
    assert splits.class_names == ["apple", "bee"] and len(splits.test) == 4
    assert len(splits.train) + len(splits.val) == 20


def test_missing_cifar_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="download=True") as err:
        load_dataset("cifar10", tmp_path, img_size=32)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    (tmp_path / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable CIFAR pickle"):
        load_dataset("cifar10", tmp_path, img_size=32)
    with pytest.raises(DataError, match="needs a data folder"):
        load_dataset("cifar10", None, img_size=32)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", None, img_size=32)


# ------------------------------------------------------------------------------------------ loader


def _indexed_dataset(n: int = 8, size: int = 8, hflip: bool = True) -> TensorImageDataset:
    """Every pixel of every image distinct (mod 256 within an image is enough for the checks)."""
    images = torch.arange(n * 3 * size * size).reshape(n, 3, size, size).remainder(251).to(torch.uint8)
    return TensorImageDataset(images, torch.arange(n), hflip=hflip)


def test_eval_loader_normalises_in_order():
    ds = _indexed_dataset()
    loader = make_loader(ds, 3, train=False, img_size=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batches = list(loader)
    assert [len(y) for _, y in batches] == [3, 3, 2]
    x = torch.cat([b[0] for b in batches])
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(x, (ds.images.float() / 255 - mean) / std, atol=1e-6)
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(8))
    bigger = make_loader(ds, 8, train=False, img_size=12, mean=(0, 0, 0), std=(1, 1, 1))
    assert next(iter(bigger))[0].shape == (8, 3, 12, 12)  # resized on the device, not stored at 12 px


def test_files_decoded_on_every_pass_get_loader_workers_and_the_same_batches(tmp_path):
    """An ImageFolder of large images (decoded on access, ImageNet-style) is decoded in worker processes by default,
    images held in memory are not; the workers change nothing in the batches."""
    _image_tree(tmp_path, {"a": 3, "b": 3}, size=80)
    splits = load_dataset("imagefolder", tmp_path, img_size=16, val_fraction=0.34, split="tail")
    assert isinstance(splits.train, LazyImageDataset)
    common = dict(img_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    default = make_loader(splits.train, 2, train=False, **common)
    assert default.loader.num_workers == 2 and make_loader(_indexed_dataset(), 2, False, **common).loader.num_workers == 0
    alone = make_loader(splits.train, 2, train=False, num_workers=0, **common)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(default, alone))


def test_train_loader_is_seeded_per_epoch_and_drops_the_last_partial_batch():
    ds = _indexed_dataset(10)
    make = lambda seed: make_loader(ds, 4, train=True, img_size=8, mean=(0, 0, 0), std=(1, 1, 1), seed=seed)
    a, b = make(0), make(0)
    order = lambda loader: torch.cat([y for _, y in loader]).tolist()
    assert len(a) == 2 and order(a) == order(b)
    first = [x for x, _ in a]
    assert all(torch.equal(x, y) for x, y in zip(first, [x for x, _ in b]))  # same augmentation too
    a.set_epoch(1)
    assert order(a) != order(b)
    with pytest.raises(ValueError, match="--batch-size 16: the training split has only 10 images per process"):
        make_loader(ds, 16, train=True, img_size=8, mean=(0, 0, 0), std=(1, 1, 1))


@pytest.mark.parametrize("hflip", [True, False])
def test_weak_augment_is_a_padded_crop_and_flip(hflip):
    x = _indexed_dataset(64, 8).images.float()
    out = weak_augment(x, hflip, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # pad = 8 // 8
    flips = 0
    for original, crop in zip(padded, out):
        crops = {(dy, dx, f): original[:, dy:dy + 8, dx:dx + 8].flip(-1) if f else original[:, dy:dy + 8, dx:dx + 8]
                 for dy in range(3) for dx in range(3) for f in (False, True)}
        matches = [k for k, v in crops.items() if torch.equal(v, crop)]
        assert matches, "output is not a crop of the padded image"
        flips += all(f for _, _, f in matches)
    assert (flips > 10) if hflip else flips == 0
