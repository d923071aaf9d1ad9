"""The pretraining loss and one micro-step through a DeepSpeed engine (shared by training and benchmarks)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def pretraining_losses(mlm_logits: torch.Tensor, nsp_logits: torch.Tensor,
                       batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM cross-entropy averaged over the real prediction positions, and NSP cross-entropy (d2l's loss)."""
    weights = batch["mlm_weights"].reshape(-1).float()
    mlm = F.cross_entropy(mlm_logits.float().flatten(0, 1), batch["mlm_labels"].reshape(-1).long(),
                          reduction="none")
    mlm_loss = (mlm * weights).sum() / (weights.sum() + 1e-8)
    return mlm_loss, next_sentence_loss(nsp_logits, batch)


def next_sentence_loss(nsp_logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(nsp_logits.float(), batch["nsp_label"].long())


def micro_step(engine, batch: dict[str, torch.Tensor], fused: bool = True) -> dict[str, torch.Tensor]:
    """Forward, backward and ``engine.step()`` (which steps the optimizer only at accumulation boundaries).
    Returns detached statistics (losses, correct MLM predictions) without synchronising with the device.

    ``fused``: the model computes the MLM loss itself in vocabulary chunks over the real prediction slots, never
    holding the (B, P, V) logits (same loss; ``fused=False`` is the plain logits path it is tested against)."""
    inputs = (batch["tokens"], batch["segments"], batch["valid_len"], batch["pred_positions"])
    if fused:
        _, (mlm_loss, correct), nsp_logits = engine(*inputs, mlm_labels=batch["mlm_labels"],
                                                    mlm_weights=batch["mlm_weights"])
        nsp_loss = next_sentence_loss(nsp_logits, batch)
    else:
        _, mlm_logits, nsp_logits = engine(*inputs)
        mlm_loss, nsp_loss = pretraining_losses(mlm_logits, nsp_logits, batch)
        with torch.no_grad():
            correct = ((mlm_logits.argmax(-1) == batch["mlm_labels"]).float() * batch["mlm_weights"]).sum()
    with _gradient_sync(engine):
        engine.backward(mlm_loss + nsp_loss)
    engine.step()
    return {"mlm_loss": mlm_loss.detach(), "nsp_loss": nsp_loss.detach(), "mlm_correct": correct}


def _gradient_sync(engine):
    """With one data-parallel rank and ZeRO-0 there is nothing to all-reduce, yet DeepSpeed still flattens every
    gradient into one buffer, all-reduces it and copies it back (4% of a tiny-model CPU step): skip it there."""
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        return engine.no_sync()
    return contextlib.nullcontext()
