"""Export the test-only fixture models.

    python export_test_fixtures.py --stock DIR --out DIR

writes OUT/stock-poison/1/: the stock fixture (version 1 of DIR, its weights and
metadata) wrapped so that the call raises when any sample of the batch starts
with the sentinel 12345.0 (the first feature of the first day). The tests use it
to show that one bad item does not sink its batch: the inferrer bisects a
failing batch until only the items that fail alone are left.
"""

import argparse
import json
import os

import torch
from torch import nn

SENTINEL = 12345.0


class Poisoned(nn.Module):
    def __init__(self, inner: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0] == 12345.0).any()):  # SENTINEL: TorchScript reads no globals
            raise RuntimeError("poison sample in the batch")
        return self.inner(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stock", required=True, help="the stock fixture's directory (with 1/)")
    parser.add_argument("--out", required=True, help="where the fixtures go")
    args = parser.parse_args()
    inner = torch.jit.load(os.path.join(args.stock, "1", "model.pt"))
    with open(os.path.join(args.stock, "1", "metadata.json")) as f:
        metadata = json.load(f)
    out = os.path.join(args.out, "stock-poison", "1")
    os.makedirs(out, exist_ok=True)
    scripted = torch.jit.script(Poisoned(inner).eval())
    scripted.save(os.path.join(out, "model.pt"))
    metadata["name"] = "stock-poison"
    metadata.pop("reference", None)
    metadata["sentinel"] = SENTINEL
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    # Check both paths before anyone relies on them.
    good = torch.zeros(3, 30, 105)
    assert scripted(good).shape == (3, 2)
    bad = good.clone()
    bad[1, 0, 0] = SENTINEL
    try:
        scripted(bad)
    except Exception:  # noqa: BLE001 - TorchScript raises its own error type
        pass
    else:
        raise AssertionError("the poison sample did not raise")
    print(f"exported stock-poison to {out}")


if __name__ == "__main__":
    main()
