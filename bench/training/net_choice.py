"""Is there a cheaper net with the same accuracy? Candidates beside today's `cnn`.

    PATH=.venv/bin:$PATH python -m bench.training.net_choice [--epochs 15] [--seeds 0 1 2]
        [--seconds 2] [--rounds 2] [--candidates cnn cnn_before]

Each candidate is the `cnn` layout (conv blocks, 2x2 max-pool, conv blocks, 2x2 max-pool, 3x3
pooled head) with other widths or fewer 28x28 convs. Each is trained with the project's recipe
(`bench.common.plain_cnn_epochs`: AdamW + OneCycle, flips + shifts, label smoothing) for
`--epochs` on the bundled sample, once per seed. Per candidate and seed: held-out accuracy of
eager, and the int8 and float TorchScript deployables exactly as `publish` builds them
(`export.convert_and_check`), with their parity. Speed: in-process batch-64 images/s of each
deployable, interleaved rounds over all candidates (medians), on the first seed's nets.
"""

import statistics
import warnings

import torch
from torch import nn

from bench.common import command_line, images_per_second, report, timed, trained_cnn
from lightcycle.lifecycle import export
from lightcycle.model import data
from lightcycle.model.nets import CNN, NUM_CLASSES, Normalize, _conv_block

warnings.simplefilter("ignore")


class CNNBefore(nn.Module):
    """The default `cnn` until 2026-11-26: two 32-channel convs at 28x28 where today's has one of
    16, then the same two 64-channel convs at 14x14 and the same head."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.features = nn.Sequential(_conv_block(1, 32), _conv_block(32, 32), nn.MaxPool2d(2),
                                      _conv_block(32, 64), _conv_block(64, 64), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(0.25),
                                  nn.Linear(64 * 9, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


CANDIDATES = {"cnn": CNN,  # the default: 16 channels @28x28 (one conv), then 64, 64 @14x14
              "cnn_before": CNNBefore}


def main(argv: list[str] | None = None) -> dict:
    parser = command_line(__doc__, rounds=2, seconds=2.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    args = parser.parse_args(argv)
    data_dir = str(data.default_data_dir())
    x = torch.from_numpy(data.load_split(data_dir, "test").images[:64]).unsqueeze(1).float()

    results, deployables = {}, {}
    for name in args.candidates:
        rows = []
        for seed in args.seeds:
            train_s, net = timed(trained_cnn, args.epochs, seed, CANDIDATES[name])
            int8 = export.convert_and_check(net, "quantize", data_dir)
            fp32 = export.convert_and_check(net, "script", data_dir)
            rows.append({"seed": seed, "train_s": round(train_s, 1),
                         "eager_accuracy": round(int8.eager_accuracy, 4),
                         "int8_parity_ok": int8.parity.ok,
                         "int8_accuracy_change": round(-int8.parity.accuracy_drop, 4),
                         "int8_agreement": round(int8.parity.agreement, 4),
                         "int8_synthetic_agreement": round(int8.parity.synthetic_agreement, 4),
                         "script_parity_ok": fp32.parity.ok})
            print(name, rows[-1], flush=True)
            if seed == args.seeds[0]:
                deployables[name] = {"int8": int8.module, "torchscript": fp32.module}
        results[name] = {
            "eager_accuracy_mean": round(statistics.mean(r["eager_accuracy"] for r in rows), 4),
            "eager_accuracy_by_seed": [r["eager_accuracy"] for r in rows],
            "int8_parity_ok_seeds": sum(r["int8_parity_ok"] for r in rows),
            "seeds": rows,
        }

    speeds: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):  # interleaved, so load from elsewhere hits all alike
        for name, modules in deployables.items():
            for kind, module in modules.items():
                speeds.setdefault((name, kind), []).append(images_per_second(module, x, args.seconds))
    for (name, kind), values in speeds.items():
        results[name][f"{kind}_batch64_images_per_s"] = round(statistics.median(values))
        print(name, kind, round(statistics.median(values)), flush=True)
    return report("net_choice", {"epochs": args.epochs, "seeds": args.seeds, "candidates": results}, (
        ["", "accuracy, seeds " + " / ".join(map(str, args.seeds)), "mean", "int8 gate passed",
         f"train, {args.epochs} epochs (s)", "TorchScript / int8 images/s"],
        [[name, " / ".join(f"{a:.3f}" for a in row["eager_accuracy_by_seed"]),
          row["eager_accuracy_mean"], f"{row['int8_parity_ok_seeds']} of {len(args.seeds)}",
          f"{min(r['train_s'] for r in row['seeds'])}-{max(r['train_s'] for r in row['seeds'])}",
          f"{row.get('torchscript_batch64_images_per_s'):,} / {row.get('int8_batch64_images_per_s'):,}"]
         for name, row in results.items()]))


if __name__ == "__main__":
    main()
