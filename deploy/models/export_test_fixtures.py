"""Export the test-only fixture models.

    python export_test_fixtures.py --stock DIR --out DIR

writes
- OUT/stock-poison/1/: the stock fixture (version 1 of DIR, its weights and
  metadata) wrapped so that the call raises when any sample of the batch starts
  with the sentinel 12345.0 (the first feature of the first day). The tests use it
  to show that one bad item does not sink its batch: the inferrer bisects a
  failing batch until only the items that fail alone are left.
- OUT/stock-variants/: versions of the stock fixture that a live switch must
  refuse or watch: 1 (the fixture's version 1), overconfident (confidence 1.5 on
  every answer: refused at warm-up), sometimes (confidence 1.5 only on samples
  starting with the sentinel 777.0: those answers are dead letters) and renamed
  (version 1 whose metadata names another model: not a version of this one);
  and the rollout candidates (tests/rollout.rs): same (version 1 again),
  shifted (predicted return + 0.02: disagrees), poisoned (raises on samples
  starting with the sentinel 12345.0, as stock-poison) and slow (version 1's
  answer, computed three times over).
- OUT/query-variants/ (with --query DIR): versions of the query model for
  rollouts (tests/rollout.rs): 1 (the model), relabelled (its labels listed in
  reverse order and its logits permuted to match: the same answers by name)
  and confused (every answer moved to the next label: disagrees everywhere).
- OUT/stock-light/1/: a near-free model with the stock fixture's input and
  outputs ([B, 30, 105] -> [B, 2]: the last day's mean through tanh and a
  sigmoid, a few element-wise operations). The batching benchmark runs it beside
  the LSTM to measure the serving path apart from the model (docs/benchmarks/).
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


class Overconfident(nn.Module):
    """The inner model, with confidence 1.5 everywhere or on sentinel samples."""

    def __init__(self, inner: torch.jit.ScriptModule, always: bool) -> None:
        super().__init__()
        self.inner = inner
        self.always = always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if self.always:
            hit = torch.ones_like(y[:, 1], dtype=torch.bool)
        else:
            hit = x[:, 0, 0] == 777.0
        confidence = torch.where(hit, torch.full_like(y[:, 1], 1.5), y[:, 1])
        return torch.stack([y[:, 0], confidence], dim=1)


class Shifted(nn.Module):
    """The inner model with its predicted return moved by 0.02 (kept within its declared range)."""

    def __init__(self, inner: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return torch.stack([torch.clamp(y[:, 0] + 0.02, -0.05, 0.05), y[:, 1]], dim=1)


class Slow(nn.Module):
    """The inner model's answer, computed three times: the same outputs, three times the model time."""

    def __init__(self, inner: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        y = (y + self.inner(x + 0.0)) * 0.5
        return (y + self.inner(x * 1.0)) * 0.5


class Permuted(nn.Module):
    """The query model's logits in another order: logits[:, j] = inner's logits[:, perm[j]]."""

    def __init__(self, inner: torch.jit.ScriptModule, perm: list) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", torch.tensor(perm, dtype=torch.long))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids, attention_mask).index_select(1, self.perm)


def export_query_variants(query: str, out: str) -> None:
    source = os.path.join(query, "1")
    inner = torch.jit.load(os.path.join(source, "model.pt"))
    with open(os.path.join(source, "metadata.json")) as f:
        metadata = json.load(f)
    # Reference answers are the serving version's: a variant is checked by the rollout, not by them.
    metadata.pop("reference", None)
    metadata.pop("reference_phrases", None)
    labels = metadata["labels"]
    n = len(labels)
    reversed_order = list(range(n - 1, -1, -1))
    variants = {
        "1": (inner, labels),
        "relabelled": (torch.jit.script(Permuted(inner, reversed_order).eval()), [labels[i] for i in reversed_order]),
        "confused": (torch.jit.script(Permuted(inner, [(j + 1) % n for j in range(n)]).eval()), labels),
    }
    tokenizer = metadata["tokenizer"]["file"]
    for version, (module, names) in variants.items():
        directory = os.path.join(out, "query-variants", version)
        os.makedirs(directory, exist_ok=True)
        module.save(os.path.join(directory, "model.pt"))
        with open(os.path.join(source, tokenizer), "rb") as f, open(os.path.join(directory, tokenizer), "wb") as g:
            g.write(f.read())
        with open(os.path.join(directory, "metadata.json"), "w") as f:
            json.dump({**metadata, "labels": names, "version": version}, f, indent=2)
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones(2, 8, dtype=torch.long)
    base = inner(ids, mask)
    relabelled = variants["relabelled"][0](ids, mask)
    assert variants["relabelled"][1][int(relabelled[0].argmax())] == labels[int(base[0].argmax())]
    assert int(variants["confused"][0](ids, mask)[0].argmax()) != int(base[0].argmax())
    print(f"exported query-variants to {out}")


def export_variants(stock: str, out: str) -> None:
    inner = torch.jit.load(os.path.join(stock, "1", "model.pt"))
    with open(os.path.join(stock, "1", "metadata.json")) as f:
        metadata = json.load(f)
    metadata.pop("reference", None)
    variants = {
        "1": (inner, metadata["name"]),
        "overconfident": (torch.jit.script(Overconfident(inner, True).eval()), metadata["name"]),
        "sometimes": (torch.jit.script(Overconfident(inner, False).eval()), metadata["name"]),
        "renamed": (inner, "another-model"),
        "same": (inner, metadata["name"]),
        "shifted": (torch.jit.script(Shifted(inner).eval()), metadata["name"]),
        "poisoned": (torch.jit.script(Poisoned(inner).eval()), metadata["name"]),
        "slow": (torch.jit.script(Slow(inner).eval()), metadata["name"]),
    }
    for version, (module, name) in variants.items():
        directory = os.path.join(out, "stock-variants", version)
        os.makedirs(directory, exist_ok=True)
        module.save(os.path.join(directory, "model.pt"))
        with open(os.path.join(directory, "metadata.json"), "w") as f:
            json.dump({**metadata, "name": name, "version": version}, f, indent=2)
    x = torch.zeros(2, 30, 105)
    x[1, 0, 0] = 777.0
    y = variants["sometimes"][0](x)
    assert y[0, 1] < 1.0 and y[1, 1] == 1.5, y
    x = torch.randn(3, 30, 105)
    base = inner(x)
    assert torch.allclose(variants["slow"][0](x), base, atol=1e-6)
    assert torch.allclose(variants["shifted"][0](x)[:, 0], torch.clamp(base[:, 0] + 0.02, -0.05, 0.05), atol=1e-6)
    print(f"exported stock-variants to {out}")


class Light(nn.Module):
    """Next to nothing per sample: what is left is the serving path's cost."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, -1, :].mean(dim=1)
        return torch.stack([torch.tanh(last) * 0.05, torch.sigmoid(last)], dim=1)


def export_light(stock: str, out: str) -> None:
    with open(os.path.join(stock, "1", "metadata.json")) as f:
        metadata = json.load(f)
    metadata.pop("reference", None)
    directory = os.path.join(out, "stock-light", "1")
    os.makedirs(directory, exist_ok=True)
    scripted = torch.jit.script(Light().eval())
    scripted.save(os.path.join(directory, "model.pt"))
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump({**metadata, "name": "stock-light", "version": "1"}, f, indent=2)
    y = scripted(torch.randn(4, 30, 105))
    assert y.shape == (4, 2) and bool(((y[:, 1] >= 0) & (y[:, 1] <= 1)).all()), y
    print(f"exported stock-light to {directory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stock", required=True, help="the stock fixture's directory (with 1/)")
    parser.add_argument("--out", required=True, help="where the fixtures go")
    parser.add_argument("--query", help="the query model's directory (with 1/): its variants too")
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
    export_variants(args.stock, args.out)
    export_light(args.stock, args.out)
    if args.query:
        export_query_variants(args.query, args.out)


if __name__ == "__main__":
    main()
