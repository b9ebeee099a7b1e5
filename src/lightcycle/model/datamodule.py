"""The LightningDataModule: validated IDX data, a seeded validation split, batch augmentation."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightcycle.model import data


def to_tensors(split: data.Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels as float32 (N, 1, 28, 28) in [0, 255]: the nets' input contract."""
    images = torch.from_numpy(split.images).unsqueeze(1).float()
    return images, torch.from_numpy(split.labels)


def augment(images: torch.Tensor, generator: torch.Generator | None = None,
            max_shift: int = 2) -> torch.Tensor:
    """Per-image random horizontal flips and shifts of up to `max_shift` pixels.

    Every tensor made here lives on `images`' device (Lightning has already moved the batch to
    the GPU); random draws come from `generator`'s device when one is given, then move.
    """
    n, _, h, w = images.shape
    device = images.device
    draw_on = generator.device if generator is not None else device
    flip = (torch.rand(n, generator=generator, device=draw_on) < 0.5).to(device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator,
                           device=draw_on).to(device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, :]  # (n, 1, w)
    return padded[torch.arange(n, device=device)[:, None, None], 0, rows, cols].unsqueeze(1)


class FashionMNISTDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 42,
        download: bool = False,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.download = download

    def prepare_data(self) -> None:
        data.prepare(self.data_dir, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        images, labels = to_tensors(data.load_split(self.data_dir, "train"))
        train_idx, val_idx = data.split_indices(len(labels), self.val_fraction, self.seed)
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(*to_tensors(data.load_split(self.data_dir, "test")))

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
