"""Batches for training. ``TensorLoader`` serves an in-memory set as normalised, augmented batches: a training "view"
is one random crop+flip of every image drawn from a seed, so a view can be recomputed exactly, which lets teacher
outputs be cached per view and shared by later stages. ``FolderLoader`` serves image files decoded per batch (data
too big for memory)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from PoE.core.data import ImageSet, Normalizer, opened_image
from PoE.core.errors import PoEError


def view_params(n: int, pad: int, seed: int, view: int) -> torch.Tensor:
    """Crop offsets (dy, dx in [0, 2*pad]) and flip bit for every image of one view (int64, n x 3)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + view)
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flip = torch.randint(0, 2, (n, 1), generator=g)
    return torch.cat([off, flip], 1)


def crop_flip(x: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop (zero padding of ``pad``) and horizontal flip of a batch, as torchvision does per image."""
    if pad == 0 and not bool(params[:, 2].any()):
        return x
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    params = params.to(x.device)
    rows = params[:, 0:1] + torch.arange(h, device=x.device)  # b x h
    cols = params[:, 1:2] + torch.arange(w, device=x.device)  # b x w
    cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.unsqueeze(2), cols.unsqueeze(1)]  # b x h x w x c
    return out.permute(0, 3, 1, 2)


@dataclass
class Batch:
    x: torch.Tensor  # normalised float images on the device
    y: torch.Tensor  # labels on the device
    index: torch.Tensor  # rows of the dataset (on the device holding it), to look up cached teacher outputs
    view: int  # which augmented view the images come from (-1: no augmentation)


@dataclass(frozen=True)
class Draw:
    """How a loader draws its batches: ``seed`` fixes the batch order of each epoch, ``view_seed`` (default
    ``seed``) the augmented views; this process keeps shard ``rank`` of ``world``.

    With ``world`` > 1 processes, a loader's batch size is the global batch: every rank draws the same batches and
    keeps rows ``rank::world`` of each (``batch_size / world`` images), so the ranks together see exactly the
    batches of one process and a schedule per step means the same at any process count.
    """

    seed: int = 0
    view_seed: int | None = None
    rank: int = 0
    world: int = 1

    @property
    def views(self) -> int:
        """The seed of the augmented views."""
        return self.seed if self.view_seed is None else self.view_seed

    def check(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise PoEError(f"batch size {batch_size} does not split evenly over {self.world} processes; use a multiple")


class TensorLoader:
    """Shuffled, augmented batches of an in-memory ImageSet, reproducible from (seed, epoch, view)."""

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        normalize: Normalizer,
        pad: int,
        device: torch.device | str,
        draw: Draw = Draw(),
    ) -> None:
        draw.check(batch_size)
        self.device, self.seed, self.view_seed = torch.device(device), draw.seed, draw.views
        if self.device.type == "cuda":  # a whole in-memory dataset fits on the GPU: no per-batch copies
            data = ImageSet(data.x.to(self.device), data.y.to(self.device))
        self.data, self.batch_size, self.normalize, self.pad = data, batch_size, normalize, pad
        self.rank, self.world = draw.rank, draw.world

    def __len__(self) -> int:
        return max(1, len(self.data) // self.batch_size)  # the last partial batch is dropped

    def epoch(self, epoch: int, view: int | None = None) -> Iterator[Batch]:
        """Batches of one epoch; images come from augmented ``view`` (default: the epoch number)."""
        view = epoch if view is None else view
        n = len(self.data)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        # drawn on the CPU (the same batches on every device), then moved once: no copies per batch
        perm = torch.randperm(n, generator=g).to(self.data.x.device)
        params = view_params(n, self.pad, self.view_seed, view).to(self.data.x.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]  # this rank's shard
            yield self.make_batch(idx, params[idx], view)

    def ordered(self, view: int | None, batch_size: int | None = None) -> Iterator[Batch]:
        """All images in dataset order, from ``view`` (None: un-augmented)."""
        n = len(self.data)
        params = view_params(n, self.pad, self.view_seed, view).to(self.data.x.device) if view is not None else None
        bs = batch_size or self.batch_size
        for s in range(0, n, bs):
            idx = torch.arange(s, min(s + bs, n), device=self.data.x.device)
            yield self.make_batch(idx, None if params is None else params[idx], -1 if view is None else view)

    def make_batch(self, idx: torch.Tensor, params: torch.Tensor | None, view: int) -> Batch:
        rows = idx.to(self.data.x.device)
        x = self.data.x[rows].to(self.device, non_blocking=True)
        if params is not None:
            x = crop_flip(x, params, self.pad)
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)
        return Batch(x, self.data.y[rows].to(self.device, non_blocking=True), idx, view)


def default_workers() -> int:
    """DataLoader workers when not given: one per core, at most 8."""
    return min(8, os.cpu_count() or 1)


class FolderImages(torch.utils.data.Dataset):
    """Decodes one image per item (PIL, RGB) through ``transform``; items are (uint8 3 x S x S, label, index)."""

    def __init__(self, files: list[Path], labels: list[int], transform: object, side: int | None = None) -> None:
        self.files, self.labels, self.transform, self.side = files, labels, transform, side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        try:
            with opened_image(self.files[i], self.side) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise PoEError(f"cannot read image {self.files[i]} ({e})") from None
        return self.transform(img), self.labels[i], i


def folder_transform(size: int, train: bool) -> object:
    """Random resized crop + flip (training) or resize to size*256/224 + centre crop (test), as uint8 tensors."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose([*steps, T.PILToTensor()])


class FolderLoader:
    """Batches decoded from disk by DataLoader workers: TensorLoader's interface for data that does not fit in
    memory. Batch order follows (seed, epoch); augmentation is drawn in the workers, so views are not cached
    (every Batch has view -1 and the teacher runs on it)."""

    def __init__(
        self,
        files: list[Path],
        labels: list[int],
        batch_size: int,
        normalize: Normalizer,
        size: int,
        device: torch.device | str,
        draw: Draw = Draw(),
        workers: int = 0,
    ) -> None:
        draw.check(batch_size)
        self.labels = torch.tensor(labels, dtype=torch.long)
        side = round(size * 256 / 224)  # the test transform's resize: the most pixels either transform makes
        self.train_images = FolderImages(files, labels, folder_transform(size, train=True), side)
        self.test_images = FolderImages(files, labels, folder_transform(size, train=False), side)
        self.batch_size, self.normalize, self.device = batch_size, normalize, torch.device(device)
        self.seed, self.rank, self.world, self.workers = draw.seed, draw.rank, draw.world, workers
        self.view_seed = draw.views

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)  # the last partial batch is dropped

    def epoch(self, epoch: int, view: int | None = None) -> Iterator[Batch]:
        """Shuffled, augmented batches of one epoch (``view`` is ignored: each epoch draws fresh crops)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(len(self.labels), generator=g)
        index = [
            perm[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world].tolist()
            for i in range(len(self))
        ]
        crop_seed = (self.view_seed * 1_000_003 + epoch) * 64 + self.rank
        yield from self.stream(self.train_images, index, crop_seed)

    def ordered(self, view: int | None = None, batch_size: int | None = None) -> Iterator[Batch]:
        """All images in listing order, resized and centre-cropped (``view`` is ignored)."""
        bs, n = batch_size or self.batch_size, len(self.labels)
        yield from self.stream(self.test_images, [list(range(s, min(s + bs, n))) for s in range(0, n, bs)], 0)

    def stream(self, images: FolderImages, index: list[list[int]], seed: int) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(
            images,
            batch_sampler=index,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # seeds the workers' crops
        )
        try:
            for x, y, idx in loader:
                x = self.normalize(x.to(self.device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
                yield Batch(x, y.to(self.device, non_blocking=True), idx, -1)
        except PoEError as e:  # raised in a worker: keep the original one-line message, not the traceback
            raise PoEError(str(e).strip().splitlines()[-1].removeprefix("PoE.core.errors.PoEError: ")) from None
