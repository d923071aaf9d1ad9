"""d2l's own BERT pretraining code (the ``d2l`` pip package, d2l.ai section 15.10) as the reference of
``bench/vs_reference.py``: ``d2l.BERTModel``, ``torch.optim.Adam`` and the book's ``train_bert`` step, timed as
the book times it (``trainer.zero_grad()`` outside, forward + loss + backward + ``trainer.step()`` + the metric
read inside the timer).

``d2l.torch`` imports plotting, image and download modules at the top (torchvision, PIL, pandas, matplotlib,
IPython, scipy) that its BERT code never calls: those that are not installed are replaced by empty modules for this
process only (``pip install d2l --no-deps`` is all the bench needs).

The model's structure is d2l's, not BERT's, so only part of bertds' initial weights can be carried over
(``load_bertds_weights``): d2l has no embedding LayerNorm, uses ReLU (not GELU) in the FFN and the MLM head,
LayerNorm eps 1e-5 (not 1e-12), an untied MLM decoder (given a copy of the tied embedding) and 1000 learned positions
(the first 512 copied). The losses are therefore close, not equal; the equality of computation is proven against the
local replica ``bench/reference_bert.py`` instead.

Run as a script, it is the d2l side of ``bench/vs_reference.py``: one fresh process that times the book's step on the
batches and initial weights that the bench saved, with torch's defaults (nothing of bertds' process settings):

    python bench/d2l_book.py INPUTS.pt RESULT.json --warmup 2 --steps 3 [--threads 2] [--lr 0.01]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bertds.model import BertConfig

# What d2l/torch.py imports at module level but its BERT, attention and Adam code never uses.
UNUSED_IMPORTS = (
    "torchvision",
    "torchvision.transforms",
    "PIL",
    "PIL.Image",
    "pandas",
    "requests",
    "IPython",
    "IPython.display",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib_inline",
    "matplotlib_inline.backend_inline",
    "scipy",
    "scipy.spatial",
)


class _Unused:
    """Stands for anything taken from a stubbed module; calling it says so instead of failing obscurely."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} is stubbed out by bench/d2l_book.py (not installed)")

    def __getattr__(self, attr: str):
        return _Unused(f"{self.name}.{attr}")


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return sys.modules.get(f"{name}.{attr}") or _Unused(f"{name}.{attr}")

    module.__getattr__ = missing  # PEP 562: `from name import attr` finds stubbed submodules and placeholders
    return module


def import_d2l():
    """``d2l.torch``, with the uninstalled unused imports stubbed; None when the d2l package is not installed."""
    if importlib.util.find_spec("d2l") is None:
        return None
    for name in UNUSED_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _stub_module(name)
    return importlib.import_module("d2l.torch")


def d2l_version() -> str:
    return importlib.metadata.version("d2l")


def build_bert(d2l, config, example_batch: tuple[torch.Tensor, ...]) -> nn.Module:
    """The book's ``d2l.BERTModel(len(vocab), num_hiddens=128, ffn_num_hiddens=256, num_heads=2, num_blks=2,
    dropout=0.2)`` for bertds' config, its lazy layers materialised by one forward pass on a d2l batch (as
    ``_WikiTextDataset`` yields it) as the book does."""
    net = d2l.BERTModel(
        config.vocab_size,
        num_hiddens=config.hidden_size,
        ffn_num_hiddens=config.ffn_size,
        num_heads=config.num_heads,
        num_blks=config.num_layers,
        dropout=config.dropout,
    )
    tokens, segments, valid_lens, pred_positions = example_batch[:4]
    with torch.no_grad():
        net(tokens, segments, valid_lens, pred_positions)
    return net


def load_bertds_weights(net: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copies bertds' initial weights into d2l's BERTModel wherever the structures match (the fused qkv split in
    three, the tied decoder copied); returns the bertds tensors d2l has no place for."""
    sources = {
        "encoder.token_embedding.weight": "bert.embeddings.word_embeddings.weight",
        "encoder.segment_embedding.weight": "bert.embeddings.token_type_embeddings.weight",
        "hidden.0.weight": "bert.pooler.dense.weight",
        "hidden.0.bias": "bert.pooler.dense.bias",
        "nsp.output.weight": "nsp.seq_relationship.weight",
        "nsp.output.bias": "nsp.seq_relationship.bias",
        "mlm.mlp.0.weight": "mlm.dense.weight",
        "mlm.mlp.0.bias": "mlm.dense.bias",
        "mlm.mlp.2.weight": "mlm.LayerNorm.weight",
        "mlm.mlp.2.bias": "mlm.LayerNorm.bias",
        "mlm.mlp.3.weight": "mlm.decoder.weight",
        "mlm.mlp.3.bias": "mlm.decoder.bias",
    }
    for i in range(len(net.encoder.blks)):
        src, dst = f"bert.encoder.layer.{i}.", f"encoder.blks.{i}."
        for kind in ("weight", "bias"):
            sources.update(
                {
                    f"{dst}attention.W_o.{kind}": f"{src}attention.dense.{kind}",
                    f"{dst}addnorm1.ln.{kind}": f"{src}attention_LayerNorm.{kind}",
                    f"{dst}ffn.dense1.{kind}": f"{src}intermediate.{kind}",
                    f"{dst}ffn.dense2.{kind}": f"{src}output.{kind}",
                    f"{dst}addnorm2.ln.{kind}": f"{src}output_LayerNorm.{kind}",
                }
            )
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, key in sources.items():
            params[name].copy_(state[key])
        for i in range(len(net.encoder.blks)):
            for kind in ("weight", "bias"):
                qkv = state[f"bert.encoder.layer.{i}.attention.qkv.{kind}"].chunk(3)
                for part, proj in zip(qkv, ("W_q", "W_k", "W_v")):
                    params[f"encoder.blks.{i}.attention.{proj}.{kind}"].copy_(part)
        positions = state["bert.embeddings.position_embeddings.weight"]
        params["encoder.pos_embedding"][0, : positions.shape[0]].copy_(positions)
    used = {*sources.values(), "bert.embeddings.position_embeddings.weight"}
    return sorted(k for k in state if k not in used and ".attention.qkv." not in k)


def load_wiki(d2l, data_dir: str, batch_size: int, max_len: int):
    """The book's ``d2l.load_data_wiki(batch_size, max_len)`` on a local WikiText-2 directory (no download):
    ``_read_wiki``, ``_WikiTextDataset`` and a shuffling DataLoader with ``d2l.get_dataloader_workers()``
    workers. Returns (train_iter, vocab)."""
    train_set = d2l._WikiTextDataset(d2l._read_wiki(data_dir), max_len)
    train_iter = torch.utils.data.DataLoader(
        train_set, batch_size, shuffle=True, num_workers=d2l.get_dataloader_workers()
    )
    return train_iter, train_set.vocab


def to_d2l_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A bertds d2l-recipe batch as ``_WikiTextDataset`` yields it: (tokens, segments, valid_lens, pred_positions,
    mlm_weights, mlm_labels, nsp_labels), int64 ids, float32 valid lengths and weights."""
    return (
        batch["tokens"].long(),
        batch["segments"].long(),
        batch["valid_len"].float(),
        batch["pred_positions"].long(),
        batch["mlm_weights"].float(),
        batch["mlm_labels"].long(),
        batch["nsp_label"].long(),
    )


class BookTrainer:
    """The body of the book's ``train_bert`` loop for one batch, with its timer: ``step`` returns the total loss,
    ``timer_s`` sums the time the book's ``d2l.Timer`` would, ``pairs`` the ``metric[2]`` it divides by."""

    def __init__(self, d2l, net: nn.Module, vocab_size: int, lr: float):
        self.d2l, self.net, self.vocab_size = d2l, net, vocab_size
        self.loss = nn.CrossEntropyLoss()
        self.trainer = torch.optim.Adam(net.parameters(), lr=lr)
        self.timer_s, self.pairs = 0.0, 0

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One step on a bertds batch, in d2l's dtypes."""
        return self.step_d2l(to_d2l_batch(batch))

    def step_d2l(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One step on a batch as d2l's own DataLoader yields it (already on the model's device)."""
        tokens_X, segments_X, valid_lens_x, pred_positions_X, mlm_weights_X, mlm_Y, nsp_y = batch
        self.trainer.zero_grad()
        start = time.perf_counter()
        mlm_l, nsp_l, total_l = self.d2l._get_batch_loss_bert(
            self.net,
            self.loss,
            self.vocab_size,
            tokens_X,
            segments_X,
            valid_lens_x,
            pred_positions_X,
            mlm_weights_X,
            mlm_Y,
            nsp_y,
        )
        total_l.backward()
        self.trainer.step()
        float(mlm_l.detach()), float(nsp_l.detach())  # the book's metric.add(mlm_l, nsp_l, ...) reads both
        self.timer_s += time.perf_counter() - start
        self.pairs += tokens_X.shape[0]
        return total_l.detach()


def time_book_steps(d2l, inputs: dict, warmup: int, steps: int, lr: float) -> dict:
    """The book's step on the saved batches (cycled) from the saved bertds weights: ``warmup`` untimed steps, then
    ``steps`` timed by the book's timer. Returns seconds per timed step, their losses and the unmapped weights."""
    config, batches = BertConfig.from_dict(inputs["config"]), inputs["batches"]
    net = build_bert(d2l, config, to_d2l_batch(batches[0]))
    unmapped = load_bertds_weights(net, inputs["state_dict"])
    trainer = BookTrainer(d2l, net, config.vocab_size, lr)
    net.train()
    for i in range(warmup):
        trainer.step(batches[i % len(batches)])
    timer_s = trainer.timer_s
    losses = [float(trainer.step(batches[(warmup + i) % len(batches)])) for i in range(steps)]
    return {"step_s": (trainer.timer_s - timer_s) / steps, "losses": losses, "unmapped": unmapped}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="times d2l's own BERT step in this process (for bench/vs_reference.py)")
    p.add_argument("inputs", help="torch.save'd {'batches', 'state_dict', 'config'} written by bench/vs_reference.py")
    p.add_argument("result", help="where to write the timing as JSON")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01, help="the book's Adam learning rate")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    d2l = import_d2l()
    if d2l is None:
        print("error: the d2l package is not installed; pip install d2l --no-deps", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = torch.load(args.inputs, weights_only=True)
    result = time_book_steps(d2l, inputs, args.warmup, args.steps, args.lr)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
