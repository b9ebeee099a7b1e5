"""Epoch time: `lightcycle.training.train` (Lightning) vs a plain PyTorch loop, same net/data/threads.

    PATH=.venv/bin:$PATH python -m bench.training.epoch [--epochs 4] [--rounds 5]

Both sides run the same CNN, the same DataLoader over the same sample, the same augmentation,
AdamW + OneCycle, per-epoch validation; Lightning side without MLflow (its overhead is
measured separately by bench.chain.log_model). First epoch is warm-up and not counted.
"""

import statistics
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F

from bench.common import command_line, plain_cnn_epochs, report
from lightcycle.model import data
from lightcycle.model.classifier import FashionClassifier
from lightcycle.model.datamodule import FashionMNISTDataModule


class EpochTimer(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self.start)


def lightning_epochs(epochs: int) -> list[float]:
    L.seed_everything(0, verbose=False)
    dm = FashionMNISTDataModule(str(data.default_data_dir()), batch_size=32)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[timer], default_root_dir=tmp,
                            num_sanity_val_steps=0)
        trainer.fit(FashionClassifier(learning_rate=0.005), datamodule=dm)
    return timer.times


def plain_epochs(epochs: int) -> list[float]:
    times, start = [], time.perf_counter()
    for net, val in plain_cnn_epochs(epochs):
        net.eval()
        with torch.no_grad():
            for images, labels in val:
                F.cross_entropy(net(images), labels)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__, rounds=5)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    # Alternate the two, round after round, so that neither pays alone for the process warming
    # up or for a neighbour's burst on this shared VM; the first epoch of each fit is warm-up.
    # The fastest epoch of each side is its cost with the least interference (the work is
    # deterministic and CPU-bound); the median of the per-round ratios is reported beside it.
    plain, lit, ratios = [], [], []
    for _ in range(args.rounds):
        p = plain_epochs(args.epochs)[1:]
        l = lightning_epochs(args.epochs)[1:]
        plain += p
        lit += l
        ratios.append(statistics.median(l) / statistics.median(p))
    figures = {"rounds": args.rounds, "epochs": args.epochs, "plain_epochs_s": plain,
               "lightning_epochs_s": lit, "ratios_by_round": ratios, "goal_ratio": 1.05}
    return report("epoch", figures, (["epoch (s)", "fastest", "median"], [
        ["plain PyTorch loop", min(plain), statistics.median(plain)],
        ["Lightning (`FashionClassifier`, torchmetrics)", min(lit), statistics.median(lit)],
        [f"Lightning / plain (goal <= {figures['goal_ratio']}; median: of the rounds' ratios)",
         min(lit) / min(plain), statistics.median(ratios)]]))


if __name__ == "__main__":
    main()
