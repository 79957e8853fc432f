"""Datasets: the embedded digits set, CIFAR-10/100 (official python pickles) and ImageFolder trees.

Every dataset yields `(image, label)`. Small images (<= 64 px a side, e.g. CIFAR, Tiny-ImageNet) are
decoded once at load into one uint8 tensor (N, 3, S, S) so an epoch never re-decodes a file; larger ones
(ImageNet) are decoded lazily on access. `nasloc.training.loader.make_loader` turns any of them into batches of
normalised float32 tensors on the target device and does the weak augmentation there, batch-wise.

The train/val split is deterministic (see `stratified_split`); the test split is only loaded when asked
for (`with_test=True`, used by retraining), so search never sees it.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import NaslocError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
SPLIT_RULES = ("random", "tail")
EAGER_MAX_SIDE = 64  # images up to this size are decoded once and kept in memory
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


# Used for lazily decoded (large) images, whose statistics would cost a pass over the files.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR = {
    # name: (folder inside data_dir, train files, test file, meta file, label key, class-name key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names"),
}


class DataError(NaslocError):
    """A dataset can't be found or read; the message names the path and the fix."""


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    mean: tuple[float, float, float]  # per channel, images scaled to [0, 1]
    std: tuple[float, float, float]
    class_names: list[str]
    img_size: int  # side of the square images the datasets yield
    test: Dataset | None = None


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, S, S); an item is (uint8 (3, S, S), int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = True):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"want uint8 images (N,3,H,W) and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.hflip = hflip  # whether a horizontal flip keeps the label (False for digits)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def subset(self, indices: np.ndarray) -> TensorImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImageDataset(self.images[idx].contiguous(), self.labels[idx], self.hflip)


class LazyImageDataset(Dataset):
    """Image files decoded on access.

    Without a transform an item is a uint8 (3, S, S) tensor: shorter side resized to S, centre crop.
    With one (e.g. timm's `create_transform`) it is whatever the transform makes of the RGB PIL image.
    A file that fails to decode is replaced by the next readable one, with one warning per dataset,
    so a single corrupt file can't kill a long run.
    """

    def __init__(self, files: Sequence[str], labels: Sequence[int], img_size: int,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, hflip: bool = True):
        self.files = list(files)
        self.labels = list(labels)
        self.img_size = img_size
        self.transform = transform
        self.hflip = hflip
        self._warned = False

    def __len__(self) -> int:
        return len(self.files)

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor]) -> LazyImageDataset:
        return LazyImageDataset(self.files, self.labels, self.img_size, transform, self.hflip)

    def subset(self, indices: np.ndarray) -> LazyImageDataset:
        return LazyImageDataset([self.files[i] for i in indices], [self.labels[i] for i in indices],
                                self.img_size, self.transform, self.hflip)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for j in range(i, i + len(self.files)):
            j %= len(self.files)
            img = _open_rgb(self.files[j])
            if img is not None:
                break
            if not self._warned:
                self._warned = True
                warnings.warn(f"cannot decode {self.files[j]}; using the next readable image instead "
                              f"(further failures in this dataset are not reported)", stacklevel=2)
        else:
            raise DataError(f"no readable image among the {len(self.files)} files starting at {self.files[0]}")
        if self.transform is not None:
            return self.transform(img), self.labels[j]
        return _pil_to_uint8(_fit(img, self.img_size)), self.labels[j]


def stratified_split(labels: Sequence[int], val_fraction: float, split: str = "random",
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class train/val split; returns sorted (train_idx, val_idx).

    Each class gives round(n * val_fraction) images to val (at least 1 and at most n - 1 when n >= 2).
    split="tail": the last ones of each class in dataset order (sorted file names for folders), e.g.
    images 4500-4999 of each CIFAR-10 JPEG class for val_fraction=0.1. split="random": a random choice
    seeded by (seed, class), so one class's split doesn't move when another class changes.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if split not in SPLIT_RULES:
        raise ValueError(f"split must be one of {SPLIT_RULES}, got {split!r}")
    labels = np.asarray(labels)
    val_parts = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = int(round(len(members) * val_fraction))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        if split == "random":
            members = np.random.default_rng([seed, int(c)]).permutation(members)
        val_parts.append(members[len(members) - n_val:])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def halve_val(splits: DataSplits, seed: int = 0) -> tuple[DataSplits, DataSplits]:
    """The splits twice, each with one half of the validation set (per class, random with ``seed``):
    (search half, selection half). The search scores its proxy on the first; the selection phase
    chooses among the search's best on the second, so it is not fooled by the search's own noise."""
    labels = np.asarray(splits.val.labels)
    search_idx, select_idx = stratified_split(labels, 0.5, "random", seed)
    return (replace(splits, val=splits.val.subset(search_idx)), replace(splits, val=splits.val.subset(select_idx)))


def load_dataset(name: str, data_dir: str | os.PathLike | None, img_size: int, seed: int = 0,
                 val_fraction: float = 0.1, *, split: str = "random", with_test: bool = False,
                 download: bool = False) -> DataSplits:
    """Load a dataset and split it into train/val (and test when `with_test`).

    name: "digits" (embedded, no data_dir), "cifar10"/"cifar100" (python pickles in data_dir or
    data_dir/cifar-10-batches-py | cifar-100-python; `download=True` fetches them with torchvision) or
    "imagefolder" (data_dir/<class>/*.jpg, or data_dir/train/<class>/... with optional val/ and test/).
    split: "random" or "tail", see `stratified_split`; unused when the tree has its own val/ folder.
    In-memory (small-image) sets are stored at img_size: to train CIFAR at 224 px, load it at 32 and give
    make_loader (or RetrainConfig) img_size=224, which resizes each batch on the device instead of holding
    50,000 224 px images in memory.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits(img_size, seed, val_fraction, split)
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs a data folder; pass data_dir (--data-dir PATH)")
    root = Path(data_dir).expanduser()
    if name == "imagefolder":
        return _load_imagefolder(root, img_size, seed, val_fraction, split, with_test)
    return _load_cifar(name, root, img_size, seed, val_fraction, split, with_test, download)


def _load_digits(img_size: int, seed: int, val_fraction: float, split: str) -> DataSplits:
    from sklearn.datasets import load_digits  # ships its data inside the wheel: no download

    digits = load_digits()
    grey = torch.from_numpy(np.round(digits.images * (255.0 / 16.0))).to(torch.uint8)  # values 0..16
    images = _resize_uint8(grey[:, None].expand(-1, 3, -1, -1), img_size)
    full = TensorImageDataset(images, torch.from_numpy(digits.target), hflip=False)  # a flipped 2 isn't a 2
    return _split_in_memory(full, [str(c) for c in digits.target_names], img_size, seed, val_fraction, split)


def _load_cifar(name: str, root: Path, img_size: int, seed: int, val_fraction: float, split: str,
                with_test: bool, download: bool) -> DataSplits:
    _, train_files, test_file, meta_file, label_key, names_key = _CIFAR[name]
    folder = _find_cifar(name, root, download)
    parts = [_read_pickle(folder / f) for f in train_files]
    images = torch.cat([_cifar_images(p, folder) for p in parts])
    labels = torch.cat([torch.as_tensor(p[label_key]) for p in parts])
    class_names = [n.decode() for n in _read_pickle(folder / meta_file)[names_key]]
    full = TensorImageDataset(_resize_uint8(images, img_size), labels)
    splits = _split_in_memory(full, class_names, img_size, seed, val_fraction, split)
    if with_test:
        test = _read_pickle(folder / test_file)
        splits.test = TensorImageDataset(_resize_uint8(_cifar_images(test, folder), img_size),
                                         torch.as_tensor(test[label_key]))
    return splits


def _find_cifar(name: str, root: Path, download: bool) -> Path:
    folder_name, train_files = _CIFAR[name][:2]
    for folder in (root, root / folder_name):
        if (folder / train_files[0]).is_file():
            return folder
    if download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
        except Exception as e:  # no network is the usual case; say so in one line
            raise DataError(f"{root}: downloading {name} failed ({type(e).__name__}: {e}); "
                            f"download and extract it there by hand") from e
        return root / folder_name
    raise DataError(f"{root}: no {name} python batches ({', '.join(train_files[:2])}...) here or in "
                    f"{root / folder_name}; extract the official '{folder_name}' archive there "
                    f"(the Python API's load_dataset(..., download=True) fetches it)")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: unreadable CIFAR pickle ({e}); re-extract the official archive") from e


def _cifar_images(batch: dict, folder: Path) -> torch.Tensor:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{folder}: CIFAR batch has shape {data.shape}, want (N, 3072); "
                        f"re-extract the official archive")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _load_imagefolder(root: Path, img_size: int, seed: int, val_fraction: float, split: str,
                      with_test: bool) -> DataSplits:
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; pass --data-dir pointing at an ImageFolder tree "
                        f"(root/<class>/*.jpg or root/train/<class>/*.jpg), extracting archives first")
    train_root = root / "train" if (root / "train").is_dir() else root
    class_names = _class_folders(train_root)
    files, labels = _scan_classes(train_root, class_names)
    eager = _is_small(files)
    full = _build(files, labels, img_size, eager, train_root)
    own_val = _labelled_files(root / "val", class_names)
    if own_val is not None:
        train, val = full, _build(*own_val, img_size, eager, root / "val")
    else:
        # Split on the labels of what was readable: corrupt files are gone from `full`.
        train_idx, val_idx = stratified_split(torch.as_tensor(full.labels).numpy(), val_fraction, split, seed)
        train, val = full.subset(train_idx), full.subset(val_idx)
    test = None
    if with_test:
        own_test = _labelled_files(root / "test", class_names)
        test = None if own_test is None else _build(*own_test, img_size, eager, root / "test")
    mean, std = _channel_stats(train.images) if eager else (IMAGENET_MEAN, IMAGENET_STD)
    return DataSplits(train, val, len(class_names), mean, std, class_names, img_size, test)


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{root}: folder not found; pass --data-dir pointing at an ImageFolder tree")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        what = "is empty" if not any(root.iterdir()) else "has no class subfolders"
        raise DataError(f"{root}: {what}; an ImageFolder tree needs one subfolder per class "
                        f"holding its images (root/<class>/*.jpg)")
    return classes


def _scan_classes(root: Path, class_names: list[str]) -> tuple[list[str], list[int]]:
    """Image files of each class, sorted by path inside the class folder (the "tail" split relies on it)."""
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = sorted(_image_files(root / name))
        if not found:
            raise DataError(f"{root / name}: class folder has no images ({', '.join(IMG_EXTENSIONS[:3])}...); "
                            f"add images or remove the folder")
        files += found
        labels += [label] * len(found)
    return files, labels


def _image_files(folder: Path) -> Iterator[str]:
    for dirpath, _, names in os.walk(folder, followlinks=True):
        for n in names:
            if n.lower().endswith(IMG_EXTENSIONS):
                yield os.path.join(dirpath, n)


def _labelled_files(folder: Path, class_names: list[str]) -> tuple[list[str], list[int]] | None:
    """Files and labels of a val/ or test/ tree named by the train classes, or None if it doesn't exist
    or carries no labels (Tiny-ImageNet's test/ is a bare images/ folder)."""
    if not folder.is_dir():
        return None
    annotations = folder / "val_annotations.txt"  # Tiny-ImageNet: flat images/ folder plus a label file
    if annotations.is_file():
        pairs = _annotated_files(folder, annotations)
    elif _class_folders(folder) == ["images"] and "images" not in class_names:
        return None
    else:
        pairs = [(f, c) for c in _class_folders(folder) for f in sorted(_image_files(folder / c))]
    if not pairs:
        raise DataError(f"{folder}: no images in its class folders; add images or remove the folder")
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted({c for _, c in pairs} - set(index))
    if unknown:
        raise DataError(f"{folder}: classes not in train/: {', '.join(unknown[:5])}; "
                        f"use the same class names in every split")
    return [f for f, _ in pairs], [index[c] for _, c in pairs]


def _annotated_files(folder: Path, annotations: Path) -> list[tuple[str, str]]:
    """(file, class) pairs of Tiny-ImageNet's val_annotations.txt: "<file>\t<class>\t..." per line."""
    pairs = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations}:{number}: want '<file><TAB><class>', got {line[:60]!r}; "
                            f"restore the file from the dataset's archive")
        pairs.append((str(folder / "images" / fields[0]), fields[1]))
    return pairs


def _is_small(files: list[str]) -> bool:
    """Judge by the first readable image: small ones are worth decoding once and keeping in memory."""
    for path in files[:100]:
        try:
            with Image.open(path) as img:  # reads the header only
                return max(img.size) <= EAGER_MAX_SIDE
        except (OSError, ValueError, SyntaxError):
            continue
    raise DataError(f"none of the first {min(len(files), 100)} images can be read (first: {files[0]}); "
                    f"check the files are real images")


def _build(files: list[str], labels: list[int], img_size: int, eager: bool,
           root: Path) -> TensorImageDataset | LazyImageDataset:
    if not eager:
        return LazyImageDataset(files, labels, img_size)
    images, kept, bad = [], [], []
    for path, label in zip(files, labels):
        img = _open_rgb(path)
        if img is None:
            bad.append(path)
            continue
        images.append(np.asarray(_fit(img, img_size)))
        kept.append(label)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable images under {root} (first: {bad[0]})", stacklevel=3)
    if not images:
        raise DataError(f"{root}: none of the {len(files)} images can be read; check the files are real images")
    # One permute for the whole set: per-image tensor ops would cost as much as the decoding.
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(tensor, torch.tensor(kept))


def _open_rgb(path: str) -> Image.Image | None:
    """The decoded RGB image, or None if the file is unreadable, truncated or not an image."""
    try:
        with open(path, "rb") as f:  # one read() then decoding from memory is ~15% faster on tiny files
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode fully here, so truncated files fail now rather than later
            return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _fit(img: Image.Image, size: int) -> Image.Image:
    """Shorter side resized to `size` (bilinear, antialiased by PIL), then a centre crop to a square."""
    if img.size == (size, size):
        return img
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 (N, 3, H, W) to size x size, once at load, chunked for memory."""
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    out = [F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).round_().clamp_(0, 255).to(torch.uint8)
           for part in images.split(chunk)]
    return torch.cat(out)


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for part in images.split(chunk):
        x = part.float().div_(255)
        total += x.sum(dim=(0, 2, 3)).double()
        squares += x.square_().sum(dim=(0, 2, 3)).double()
    n = images.numel() / 3
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _split_in_memory(full: TensorImageDataset, class_names: list[str], img_size: int, seed: int,
                     val_fraction: float, split: str) -> DataSplits:
    train_idx, val_idx = stratified_split(full.labels.numpy(), val_fraction, split, seed)
    train, val = full.subset(train_idx), full.subset(val_idx)
    mean, std = _channel_stats(train.images)
    return DataSplits(train, val, len(class_names), mean, std, class_names, img_size)
