"""d2l's pretraining examples: NSP sentence pairs and MLM masking, as batched ``datasets.map`` functions.

Every example holds fixed-size arrays (``max_len`` tokens, ``round(0.15 * max_len)`` prediction slots):
``tokens`` ``<cls> A <sep> B <sep> <pad>...``, ``segments`` (0 for <cls> A <sep>, 1 for B <sep>, 0 for padding),
``valid_len``, ``pred_positions``/``mlm_labels``/``mlm_weights`` (weight 0 marks a padded slot) and
``nsp_label`` (1 = B really follows A).
"""
from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from bertds.data.tokenizer import Vocab

MASK_RATE = 0.15  # of the non-special tokens, as BERT and d2l
MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE = 0.8, 0.1  # of the chosen positions; the remaining 10% stay unchanged
MAP_BATCH = 1000  # paragraphs per map batch; part of the RNG stream, so changing it changes the examples


@dataclass(frozen=True)
class ExampleConfig:
    max_len: int = 64
    seed: int = 0
    truncate: bool = False  # False: drop over-long pairs (d2l); True: truncate the longer sentence first

    @property
    def max_predictions(self) -> int:
        return round(self.max_len * MASK_RATE)


def example_features(config: ExampleConfig) -> datasets.Features:
    seq = datasets.Sequence(datasets.Value("int32"), length=config.max_len)
    preds = datasets.Sequence(datasets.Value("int32"), length=config.max_predictions)
    return datasets.Features({
        "tokens": seq, "segments": datasets.Sequence(datasets.Value("int8"), length=config.max_len),
        "valid_len": datasets.Value("int32"), "pred_positions": preds, "mlm_labels": preds,
        "mlm_weights": datasets.Sequence(datasets.Value("float32"), length=config.max_predictions),
        "nsp_label": datasets.Value("int8"),
    })


def _truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Longest-first truncation (drop from the end of the longer sentence) until len(a) + len(b) <= max_tokens."""
    excess = len(a) + len(b) - max_tokens
    while excess > 0:
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
        excess -= 1
    return a, b


def nsp_pairs(paragraphs: list[list[list[int]]], all_sentences: list[list[int]], paragraph_starts: np.ndarray,
              config: ExampleConfig, rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """For every adjacent sentence pair of every paragraph: B is the true next sentence with probability 0.5,
    else a random sentence of a random paragraph of the whole corpus (label 0)."""
    firsts, seconds, labels = [], [], []
    num_paragraphs = len(paragraph_starts) - 1
    for paragraph in paragraphs:
        n_pairs = len(paragraph) - 1
        is_next = rng.random(n_pairs) < 0.5
        random_paragraph = rng.integers(0, num_paragraphs, n_pairs)
        random_offset = rng.random(n_pairs)
        for i in range(n_pairs):
            a = paragraph[i]
            if is_next[i]:
                b = paragraph[i + 1]
            else:
                start, end = paragraph_starts[random_paragraph[i]], paragraph_starts[random_paragraph[i] + 1]
                b = all_sentences[start + int(random_offset[i] * (end - start))]
            if len(a) + len(b) + 3 > config.max_len:
                if not config.truncate:
                    continue
                a, b = _truncate_pair(a, b, config.max_len - 3)
            firsts.append(a)
            seconds.append(b)
            labels.append(int(is_next[i]))
    return firsts, seconds, labels


def pack_pairs(firsts: list[list[int]], seconds: list[list[int]], vocab: Vocab, max_len: int):
    """``<cls> A <sep> B <sep>`` padded to max_len: (tokens, segments, valid_len, len_a) arrays."""
    n = len(firsts)
    tokens = np.full((n, max_len), vocab.pad_id, dtype=np.int32)
    segments = np.zeros((n, max_len), dtype=np.int8)
    len_a = np.fromiter((len(a) for a in firsts), dtype=np.int32, count=n)
    len_b = np.fromiter((len(b) for b in seconds), dtype=np.int32, count=n)
    valid_len = len_a + len_b + 3
    for row, (a, b) in enumerate(zip(firsts, seconds)):
        tokens[row, :valid_len[row]] = [vocab.cls_id, *a, vocab.sep_id, *b, vocab.sep_id]
    positions = np.arange(max_len)
    segments[(positions >= len_a[:, None] + 2) & (positions < valid_len[:, None])] = 1
    return tokens, segments, valid_len, len_a


def mask_tokens(tokens: np.ndarray, valid_len: np.ndarray, len_a: np.ndarray, vocab: Vocab,
                max_predictions: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """BERT's masking, vectorised over a batch: choose round(15%) of the non-special positions (at least one);
    of those, 80% become <mask>, 10% a random token, 10% stay. ``tokens`` is modified in place."""
    n, max_len = tokens.shape
    positions = np.arange(max_len)
    special = ((positions == 0) | (positions == len_a[:, None] + 1) | (positions >= valid_len[:, None] - 1))
    num_candidates = (~special).sum(axis=1)
    num_preds = np.minimum(np.maximum(1, np.round(num_candidates * MASK_RATE)), max_predictions).astype(np.int64)
    # A random permutation of each row's candidates: sort random keys, with the special positions pushed last.
    keys = rng.random((n, max_len))
    keys[special] = 2.0
    chosen = np.argsort(keys, axis=1)[:, :max_predictions]
    is_pred = np.arange(max_predictions)[None, :] < num_preds[:, None]
    pred_positions = np.sort(np.where(is_pred, chosen, max_len), axis=1)  # real slots first, in position order
    is_pred = pred_positions < max_len
    pred_positions[~is_pred] = 0
    rows = np.arange(n)[:, None]
    labels = np.where(is_pred, tokens[rows, pred_positions], 0)
    draw = rng.random((n, max_predictions))
    random_tokens = rng.integers(len(vocab.special_ids), len(vocab), (n, max_predictions))
    replacement = np.where(draw < MASK_TOKEN_SHARE, vocab.mask_id,
                           np.where(draw < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE, random_tokens, labels))
    tokens[np.broadcast_to(rows, is_pred.shape)[is_pred], pred_positions[is_pred]] = replacement[is_pred]
    return {"pred_positions": pred_positions.astype(np.int32), "mlm_labels": labels.astype(np.int32),
            "mlm_weights": is_pred.astype(np.float32)}


def make_examples(paragraph_ids: datasets.Dataset, vocab: Vocab, config: ExampleConfig) -> datasets.Dataset:
    """Paragraphs of sentence token ids (column ``sentence_ids``) -> fixed-size NSP + MLM examples."""
    column = paragraph_ids["sentence_ids"]
    all_sentences = [s for paragraph in column for s in paragraph]
    paragraph_starts = np.cumsum([0] + [len(p) for p in column])

    def build(batch: dict, indices: list[int]) -> dict:
        # One generator per batch, seeded by the batch's first paragraph: the same seed gives the same examples.
        rng = np.random.default_rng([config.seed, indices[0]])
        firsts, seconds, nsp = nsp_pairs(batch["sentence_ids"], all_sentences, paragraph_starts, config, rng)
        tokens, segments, valid_len, len_a = pack_pairs(firsts, seconds, vocab, config.max_len)
        masked = mask_tokens(tokens, valid_len, len_a, vocab, config.max_predictions, rng)
        return {"tokens": tokens, "segments": segments, "valid_len": valid_len,
                "nsp_label": np.asarray(nsp, dtype=np.int8), **masked}

    return paragraph_ids.map(build, batched=True, batch_size=MAP_BATCH, with_indices=True,
                             remove_columns=paragraph_ids.column_names, features=example_features(config),
                             keep_in_memory=True, new_fingerprint=f"examples-{vocab.fingerprint()}-{config.seed}",
                             desc="NSP pairs + MLM masking")
