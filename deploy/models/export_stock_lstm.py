"""Export the fixture stock model: a small LSTM, as TorchScript, with its metadata.

    python export_stock_lstm.py --out DIR

writes two versions, DIR/1/ and DIR/2/ (the same architecture with other weights,
for switching versions at run time), each with model.pt (TorchScript),
metadata.json, and reference data that the Rust runtime must reproduce
(tests/model_reference.rs): reference_inputs.f32 ([N, 30, 105]) and
reference_outputs.f32 ([N, 2]), little-endian float32, row-major.

The weights are random but seeded: the fixture stands in for a trained model with
the users' shapes (30 days x 105 features -> predicted return, confidence). Both
versions share the input normalisation (the normalizer applies it). The
normalisation statistics are those of Sluice's synthetic history source
(crates/sluice-stages/src/fetcher/synthetic.rs uses the same two formulas).
"""

import argparse
import json
import os

import torch
from torch import nn

NAME = "stock-lstm"
VERSIONS = {"1": 7, "2": 8}  # version -> weight seed
WINDOW, FEATURES, HIDDEN = 30, 105, 64
REFERENCE_COUNT = 16


def feature_mean(f: int) -> float:
    return ((f % 7) - 3) * 0.5


def feature_std(f: int) -> float:
    return 1.0 + (f % 5) * 0.25


class StockLSTM(nn.Module):
    """[B, 30, 105] z-scored features -> [B, 2]: (predicted_return, confidence)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        y = self.head(out[:, -1, :])
        predicted_return = 0.05 * torch.tanh(y[:, 0])
        confidence = torch.sigmoid(y[:, 1])
        return torch.stack([predicted_return, confidence], dim=1)


def export(out: str, version: str, seed: int) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = StockLSTM()
    # Spread the confidences over (0, 1) so that a min_confidence filter has work to do.
    nn.init.normal_(model.head.weight, std=1.5)
    model.eval()
    scripted = torch.jit.script(model)
    scripted.save(os.path.join(out, "model.pt"))

    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(REFERENCE_COUNT, WINDOW, FEATURES, generator=generator)
    with torch.inference_mode():
        outputs = scripted(inputs)
    inputs.numpy().astype("<f4").tofile(os.path.join(out, "reference_inputs.f32"))
    outputs.numpy().astype("<f4").tofile(os.path.join(out, "reference_outputs.f32"))

    metadata = {
        "name": NAME,
        "version": version,
        "kind": "stock",
        "input_shape": [WINDOW, FEATURES],
        "normalization": {
            "mean": [feature_mean(f) for f in range(FEATURES)],
            "std": [feature_std(f) for f in range(FEATURES)],
        },
        # min and max: the valid range of each output, checked on every answer
        # (and cached answer); a version that answers outside it is refused.
        "outputs": [
            {
                "name": "predicted_return",
                "meaning": "expected return over the next day, as a fraction (0.01 = 1%), in (-0.05, 0.05)",
                "min": -0.05,
                "max": 0.05,
            },
            {"name": "confidence", "meaning": "the model's confidence in that return, in (0, 1)", "min": 0.0, "max": 1.0},
        ],
        "reference": {
            "inputs": "reference_inputs.f32",
            "outputs": "reference_outputs.f32",
            "count": REFERENCE_COUNT,
        },
        "exported_with": {"torch": torch.__version__},
    }
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    print(f"exported {NAME} v{version} to {out}: confidences {outputs[:, 1].min():.3f}..{outputs[:, 1].max():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (one subdirectory per version)")
    args = parser.parse_args()
    for version, seed in VERSIONS.items():
        export(os.path.join(args.out, version), version, seed)


if __name__ == "__main__":
    main()
