"""bertds' d2l recipe held against d2l's own code (the ``d2l`` pip package: ``_read_wiki``, ``_WikiTextDataset``,
``Vocab``), in one run, on WikiText-2 train, max_len 64, over several seeds:

    python bench/recipe_fidelity.py                     # 5 seeds each
    python bench/recipe_fidelity.py --seeds 8 --data-dir ../shared/data/wikitext-2
    python bench/recipe_fidelity.py --google bert/create_pretraining_data.py --albert albert/create_pretraining_data.py

Install d2l without its pinned dependencies (``pip install d2l==1.0.3 --no-deps``); the modules its torch BERT data
code never uses (torchvision, IPython, scipy, matplotlib_inline, where absent) are stubbed here, in this process only.

``--google`` / ``--albert`` name local copies of google-research/bert's and google-research/albert's
``create_pretraining_data.py``: their ``create_instances_from_document`` (tensorflow, six and their tokenization
module stubbed; the flags set as for whole-word masking and for SOP) runs on the same WordPiece sentences as bertds'
``--recipe bert`` (max_len 128, WikiText's sentences), against bertds with ``--whole-word-masking`` and with
``--sentence-task sop``.

For each statistic the table gives the mean and standard deviation over the seeds for d2l and for bertds, and
whether they agree: the difference of the means is within twice the seed-to-seed spread of one seed's difference
(2 * sqrt(sd_d2l^2 + sd_bertds^2)); a statistic that does not vary with the seed (the vocabulary) must be equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import statistics
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bertds.data import ExampleConfig, build_examples, resolve_corpus
from bertds.data.loader import table_columns
from bertds.errors import run_cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
UNUSED_BY_BERT_DATA = {
    "torchvision": ["transforms"],
    "IPython": ["display"],
    "scipy": ["spatial"],
    "matplotlib_inline": ["backend_inline"],
}
LENGTH_BINS = (16, 32, 48)  # valid_len shares: <= 16, 17-32, 33-48, > 48


def import_d2l():
    """``d2l.torch`` with the modules its BERT data code never touches stubbed when they are not installed."""
    for name, children in UNUSED_BY_BERT_DATA.items():
        if importlib.util.find_spec(name) is None:
            parent = sys.modules[name] = types.ModuleType(name)
            for child in children:
                module = sys.modules[f"{name}.{child}"] = types.ModuleType(f"{name}.{child}")
                setattr(parent, child, module)
    sys.modules["scipy.spatial"].distance_matrix = None  # imported by name at d2l's top level
    from d2l import torch as d2l

    return d2l


def statistics_of(tokens, valid_len, pred_positions, mlm_weights, mlm_labels, nsp_label, mask_id) -> dict:
    real = mlm_weights > 0
    rows = np.broadcast_to(np.arange(len(tokens))[:, None], pred_positions.shape)
    shown = tokens[rows[real], pred_positions[real]]
    labels = mlm_labels[real]
    is_mask = shown == mask_id
    kept = ~is_mask & (shown == labels)
    stats = {"examples": len(tokens), "valid_len mean": valid_len.mean(), "valid_len sd": valid_len.std()}
    edges = (0, *LENGTH_BINS, 10**9)
    for low, high in zip(edges[:-1], edges[1:]):
        stats[f"valid_len in {low + 1}-{high if high < 10**9 else 'max'}"] = (
            (valid_len > low) & (valid_len <= high)
        ).mean()
    stats.update(
        {
            "predictions / example": real.sum(axis=1).mean(),
            "<mask> share": is_mask.mean(),
            "random share": (~is_mask & ~kept).mean(),
            "kept share": kept.mean(),
            "NSP is-next share": nsp_label.mean(),
        }
    )
    return stats


def d2l_run(d2l, data_dir: Path, max_len: int, seed: int) -> tuple[dict, set]:
    random.seed(seed)
    dataset = d2l._WikiTextDataset(d2l._read_wiki(str(data_dir)), max_len)
    columns = (
        dataset.all_token_ids,
        dataset.valid_lens,
        dataset.all_pred_positions,
        dataset.all_mlm_weights,
        dataset.all_mlm_labels,
        dataset.nsp_labels,
    )  # lists of per-example tensors
    tokens, valid_len, positions, weights, labels, nsp = (torch.stack(c).numpy() for c in columns)
    return statistics_of(tokens, valid_len, positions, weights, labels, nsp, dataset.vocab["<mask>"]), set(
        dataset.vocab.idx_to_token
    )


def bertds_run(data_dir: Path, max_len: int, seed: int) -> tuple[dict, set]:
    examples, vocab = build_examples(resolve_corpus([str(data_dir)]), ExampleConfig(max_len=max_len, seed=seed))
    c = table_columns(examples.data.table)
    return statistics_of(
        c["tokens"],
        c["valid_len"],
        c["pred_positions"],
        c["mlm_weights"],
        c["mlm_labels"],
        c["nsp_label"],
        vocab.mask_id,
    ), set(vocab.tokenizer.get_vocab())


def stub_reference_imports() -> None:
    """The modules Google's and ALBERT's scripts import but their example creation never calls."""
    flags = types.SimpleNamespace(
        FLAGS=None,
        **{f"DEFINE_{kind}": lambda *a, **k: None for kind in ("string", "bool", "integer", "float", "enum")},
    )
    tf = types.ModuleType("tensorflow")
    tf.flags, tf.compat = flags, types.SimpleNamespace(v1=tf)
    six = types.ModuleType("six")
    six.ensure_str, six.moves = str, types.ModuleType("six.moves")
    six.moves.range, six.moves.zip = range, zip
    tokenization = types.ModuleType("tokenization")
    albert = types.ModuleType("albert")
    albert.tokenization = tokenization
    sys.modules.update(
        {
            "tensorflow": tf,
            "tensorflow.compat": tf.compat,
            "tensorflow.compat.v1": tf,
            "six": six,
            "six.moves": six.moves,
            "tokenization": tokenization,
            "albert": albert,
            "albert.tokenization": tokenization,
        }
    )


def load_reference(path: Path, **flags) -> dict:
    """The functions of a create_pretraining_data.py, its FLAGS replaced by ``flags``."""
    namespace = {"__name__": "reference"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # __name__ is not __main__: main() does not run
    namespace["FLAGS"] = types.SimpleNamespace(**flags)
    return namespace


def bert_recipe_statistics(
    valid_len: np.ndarray, random_or_swapped: np.ndarray, predictions: np.ndarray | None, max_predictions: int
) -> dict:
    stats = {
        "examples": len(valid_len),
        "valid_len mean": valid_len.mean(),
        "valid_len < 64": (valid_len < 64).mean(),
        "label 'random' share": random_or_swapped.mean(),
    }
    if predictions is not None:
        target = np.minimum(max_predictions, np.maximum(1, np.round(valid_len * 0.15)))
        stats.update({"predictions / example": predictions.mean(), "fewer than target": (predictions < target).mean()})
    return stats


def google_comparison(data_dir: Path, seeds: int, google: Path | None, albert: Path | None) -> None:
    from bertds.data.bert_examples import chunk_sentences
    from bertds.data.prepare import DOCUMENTS_PER_CHUNK, TokenizerChoice, bert_chunks, obtain_vocab

    max_len, max_predictions = 128, 20
    corpus = resolve_corpus([str(data_dir / "wiki.train.tokens")])
    vocab = obtain_vocab(corpus, TokenizerChoice("wordpiece"), None)
    words = [vocab.tokenizer.id_to_token(i) for i in range(len(vocab))]
    texts = [row["text"] for row in corpus.documents()]
    documents = []  # Google's all_documents: per document, per sentence, its WordPiece tokens
    for first in range(0, len(texts), DOCUMENTS_PER_CHUNK):
        chunk = chunk_sentences(texts[first : first + DOCUMENTS_PER_CHUNK], vocab, corpus.wikitext, corpus.tokenized)
        documents += [
            [
                [words[t] for t in chunk.ids[chunk.start[s] : chunk.end[s]]]
                for s in range(chunk.doc_bounds[d], chunk.doc_bounds[d + 1])
            ]
            for d in range(chunk.num_docs)
        ]
    stub_reference_imports()
    for name, path, sop, flags in (
        ("Google NSP, whole-word masking", google, False, {"do_whole_word_mask": True}),
        (
            "ALBERT SOP",
            albert,
            True,
            {
                "random_next_sentence": False,
                "do_whole_word_mask": False,
                "ngram": 1,
                "favor_shorter_ngram": True,
                "do_permutation": False,
                "spm_model_file": None,
            },
        ),
    ):
        if path is None:
            continue
        create = load_reference(path, **flags)["create_instances_from_document"]
        theirs, ours = [], []
        for seed in range(seeds):
            rng = random.Random(seed)
            instances = [
                x
                for i in range(len(documents))
                for x in create(documents, i, max_len, 0.1, 0.0 if sop else 0.15, max_predictions, words, rng)
            ]
            theirs.append(
                bert_recipe_statistics(
                    np.asarray([len(x.tokens) for x in instances]),
                    np.asarray([x.is_random_next for x in instances]),
                    None if sop else np.asarray([len(x.masked_lm_positions) for x in instances]),
                    max_predictions,
                )
            )
            config = ExampleConfig(
                max_len=max_len,
                recipe="bert",
                seed=seed,
                whole_word_masking=not sop,
                sentence_task="sop" if sop else "nsp",
            )
            parts = list(bert_chunks(corpus, vocab, config, streaming=False))
            c = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            ours.append(
                bert_recipe_statistics(
                    c["valid_len"],
                    c["nsp_label"] == (1 if sop else 0),
                    None if sop else (c["mlm_weights"] > 0).sum(axis=1),
                    max_predictions,
                )
            )
        print(
            f"\n{name}: WikiText-2 train, WordPiece {len(vocab)}, max_len {max_len}, {seeds} seeds each "
            "('random': NSP random next segment; SOP swapped or from another document)"
        )
        print(f"{'statistic':<24} | {'reference script':>20} | {'bertds':>20} | agrees")
        for key in theirs[0]:
            print(row(key, [s[key] for s in theirs], [s[key] for s in ours]))


def agree(a: list[float], b: list[float]) -> bool:
    spread = math.sqrt(statistics.pstdev(a) ** 2 + statistics.pstdev(b) ** 2)
    difference = abs(statistics.mean(a) - statistics.mean(b))
    return difference == 0 if spread == 0 else difference <= 2 * spread


def row(name: str, a: list[float], b: list[float]) -> str:
    digits = 0 if name == "examples" or name.startswith("vocabulary") else 4

    def cell(values):
        return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"

    return f"{name:<24} | {cell(a):>20} | {cell(b):>20} | {'yes' if agree(a, b) else 'NO'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DATA)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--google", type=Path, help="google-research/bert's create_pretraining_data.py")
    p.add_argument("--albert", type=Path, help="google-research/albert's create_pretraining_data.py")
    p.add_argument("--skip-d2l", action="store_true")
    args = p.parse_args()
    if args.google or args.albert:
        google_comparison(args.data_dir, args.seeds, args.google, args.albert)
    if args.skip_d2l:
        return
    d2l = import_d2l()
    ours, theirs, vocabularies = [], [], []
    for seed in range(args.seeds):
        stats, d2l_vocab = d2l_run(d2l, args.data_dir, args.max_len, seed)
        theirs.append(stats)
        stats, own_vocab = bertds_run(args.data_dir, args.max_len, seed)
        ours.append(stats)
        vocabularies.append((d2l_vocab, own_vocab))
        print(f"seed {seed}: d2l {theirs[-1]['examples']} examples, bertds {stats['examples']}", flush=True)
    print(f"\nWikiText-2 train, max_len {args.max_len}, {args.seeds} seeds each (mean ± sd over seeds)")
    print(f"{'statistic':<24} | {'d2l (package)':>20} | {'bertds':>20} | agrees")
    print(row("vocabulary size", [len(v[0]) for v in vocabularies], [len(v[1]) for v in vocabularies]))
    same = all(d2l_vocab == own_vocab for d2l_vocab, own_vocab in vocabularies)
    print(
        f"{'vocabulary (as a set)':<24} | {'':>20} | {'':>20} | {'yes' if same else 'NO'}"
        + ("" if same else f" ({len(vocabularies[0][0] ^ vocabularies[0][1])} tokens differ)")
    )
    for name in theirs[0]:
        print(row(name, [s[name] for s in theirs], [s[name] for s in ours]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
