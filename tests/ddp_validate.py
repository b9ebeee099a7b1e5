"""Validate one seeded net on a data_dir with N CPU processes; rank 0 prints the logged
metrics as JSON. Lightning's DDP starts the other ranks by running this file again."""

import json
import sys

import lightning as L

from lightcycle.model.classifier import FashionClassifier
from lightcycle.model.datamodule import FashionMNISTDataModule

devices, data_dir = int(sys.argv[1]), sys.argv[2]
L.seed_everything(0, verbose=False)
module = FashionClassifier(model="cnn")
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    deterministic=True)
[metrics] = trainer.validate(module, datamodule=FashionMNISTDataModule(data_dir, batch_size=16),
                             verbose=False)
if trainer.is_global_zero:
    print("METRICS " + json.dumps(metrics))
