"""A straightforward eager BERT with d2l's structure (d2l.ai chapters 11 and 15.8), the baseline of
``bench/vs_reference.py``: separate query/key/value projections, heads folded into the batch by
``transpose_qkv``, explicit ``masked_softmax`` (masked scores set to -1e6), AddNorm blocks, MLM head on the
gathered prediction positions, plain ``torch.optim.Adam``. It computes exactly what ``bertds`` computes (GELU,
post-LN, tied MLM decoder, tanh pooler, LayerNorm eps), so ``load_bertds_state_dict`` gives identical losses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bertds.model import BertConfig


def masked_softmax(x: torch.Tensor, valid_lens: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with the keys at and beyond each row's valid length masked out (d2l)."""
    shape = x.shape
    valid_lens = torch.repeat_interleave(valid_lens, shape[1]) if valid_lens.dim() == 1 else valid_lens.reshape(-1)
    x = x.reshape(-1, shape[-1])
    mask = torch.arange(shape[-1], device=x.device)[None, :] < valid_lens[:, None]
    x = x.masked_fill(~mask, -1e6)
    return nn.functional.softmax(x.reshape(shape), dim=-1)


class DotProductAttention(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values, valid_lens):
        scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(queries.shape[-1])
        self.attention_weights = masked_softmax(scores, valid_lens)
        return torch.bmm(self.dropout(self.attention_weights), values)


def transpose_qkv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    x = x.reshape(x.shape[0], x.shape[1], num_heads, -1).permute(0, 2, 1, 3)
    return x.reshape(-1, x.shape[2], x.shape[3])


def transpose_output(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    x = x.reshape(-1, num_heads, x.shape[1], x.shape[2]).permute(0, 2, 1, 3)
    return x.reshape(x.shape[0], x.shape[1], -1)


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention = DotProductAttention(dropout)
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, queries, keys, values, valid_lens):
        queries = transpose_qkv(self.W_q(queries), self.num_heads)
        keys = transpose_qkv(self.W_k(keys), self.num_heads)
        values = transpose_qkv(self.W_v(values), self.num_heads)
        valid_lens = torch.repeat_interleave(valid_lens, repeats=self.num_heads, dim=0)
        return self.W_o(transpose_output(self.attention(queries, keys, values, valid_lens), self.num_heads))


class PositionWiseFFN(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense1, self.dense2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        return self.dense2(nn.functional.gelu(self.dense1(x)))


class AddNorm(nn.Module):
    def __init__(self, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.dropout, self.ln = nn.Dropout(dropout), nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, y):
        return self.ln(self.dropout(y) + x)


class EncoderBlock(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = MultiHeadAttention(c.hidden_size, c.num_heads, c.attention_dropout)
        self.addnorm1 = AddNorm(c.hidden_size, c.dropout, c.layer_norm_eps)
        self.ffn = PositionWiseFFN(c.hidden_size, c.ffn_size)
        self.addnorm2 = AddNorm(c.hidden_size, c.dropout, c.layer_norm_eps)

    def forward(self, x, valid_lens):
        y = self.addnorm1(x, self.attention(x, x, x, valid_lens))
        return self.addnorm2(y, self.ffn(y))


class BERTEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.segment_embedding = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.pos_embedding = nn.Parameter(torch.randn(1, c.max_position_embeddings, c.hidden_size))
        self.ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # BERT normalises the embedding sum
        self.dropout = nn.Dropout(c.dropout)
        self.blks = nn.Sequential(*(EncoderBlock(c) for _ in range(c.num_layers)))

    def forward(self, tokens, segments, valid_lens):
        x = self.token_embedding(tokens) + self.segment_embedding(segments)
        x = self.dropout(self.ln(x + self.pos_embedding[:, : x.shape[1], :]))
        for blk in self.blks:
            x = blk(x, valid_lens)
        return x


class MaskLM(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(c.hidden_size, c.hidden_size),
            nn.GELU(),
            nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
            nn.Linear(c.hidden_size, c.vocab_size),
        )

    def forward(self, x, pred_positions):
        num_pred_positions = pred_positions.shape[1]
        pred_positions = pred_positions.reshape(-1)
        batch_idx = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), num_pred_positions)
        masked_x = x[batch_idx, pred_positions].reshape(x.shape[0], num_pred_positions, -1)
        return self.mlp(masked_x)


class BERTModel(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.encoder = BERTEncoder(c)
        self.hidden = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.Tanh())
        self.mlm = MaskLM(c)
        self.nsp = nn.Linear(c.hidden_size, 2)
        self.mlm.mlp[3].weight = self.encoder.token_embedding.weight  # tied decoder, as bertds

    def forward(self, tokens, segments, valid_lens, pred_positions):
        encoded = self.encoder(tokens, segments, valid_lens)
        mlm_y_hat = self.mlm(encoded, pred_positions)
        nsp_y_hat = self.nsp(self.hidden(encoded[:, 0, :]))
        return encoded, mlm_y_hat, nsp_y_hat


def pretraining_loss(net: BERTModel, batch: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """d2l's ``_get_batch_loss_bert``: weighted MLM cross-entropy + NSP cross-entropy."""
    loss = nn.CrossEntropyLoss(reduction="none")
    _, mlm_y_hat, nsp_y_hat = net(batch["tokens"], batch["segments"], batch["valid_len"], batch["pred_positions"])
    weights = batch["mlm_weights"].reshape(-1, 1)
    mlm_l = loss(mlm_y_hat.reshape(-1, vocab_size), batch["mlm_labels"].reshape(-1).long()) * weights.reshape(-1)
    mlm_l = mlm_l.sum() / (weights.sum() + 1e-8)
    nsp_l = loss(nsp_y_hat, batch["nsp_label"].long()).mean()
    return mlm_l + nsp_l


def load_bertds_state_dict(net: BERTModel, state: dict[str, torch.Tensor]) -> None:
    """Copies a ``bertds.BertForPreTraining`` state dict into the reference (the fused qkv is split in three)."""
    mapped = {
        "encoder.token_embedding.weight": state["bert.embeddings.word_embeddings.weight"],
        "encoder.segment_embedding.weight": state["bert.embeddings.token_type_embeddings.weight"],
        "encoder.pos_embedding": state["bert.embeddings.position_embeddings.weight"][None],
        "encoder.ln.weight": state["bert.embeddings.LayerNorm.weight"],
        "encoder.ln.bias": state["bert.embeddings.LayerNorm.bias"],
        "hidden.0.weight": state["bert.pooler.dense.weight"],
        "hidden.0.bias": state["bert.pooler.dense.bias"],
        "nsp.weight": state["nsp.seq_relationship.weight"],
        "nsp.bias": state["nsp.seq_relationship.bias"],
        "mlm.mlp.0.weight": state["mlm.dense.weight"],
        "mlm.mlp.0.bias": state["mlm.dense.bias"],
        "mlm.mlp.2.weight": state["mlm.LayerNorm.weight"],
        "mlm.mlp.2.bias": state["mlm.LayerNorm.bias"],
        "mlm.mlp.3.weight": state["mlm.decoder.weight"],
        "mlm.mlp.3.bias": state["mlm.decoder.bias"],
    }
    for i in range(len(net.encoder.blks)):
        src, dst = f"bert.encoder.layer.{i}.", f"encoder.blks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attention.qkv.{kind}"].chunk(3)
            mapped.update(
                {
                    f"{dst}attention.W_q.{kind}": q,
                    f"{dst}attention.W_k.{kind}": k,
                    f"{dst}attention.W_v.{kind}": v,
                    f"{dst}attention.W_o.{kind}": state[f"{src}attention.dense.{kind}"],
                    f"{dst}addnorm1.ln.{kind}": state[f"{src}attention_LayerNorm.{kind}"],
                    f"{dst}ffn.dense1.{kind}": state[f"{src}intermediate.{kind}"],
                    f"{dst}ffn.dense2.{kind}": state[f"{src}output.{kind}"],
                    f"{dst}addnorm2.ln.{kind}": state[f"{src}output_LayerNorm.{kind}"],
                }
            )
    with torch.no_grad():
        for name, p in net.state_dict().items():
            p.copy_(mapped[name])
