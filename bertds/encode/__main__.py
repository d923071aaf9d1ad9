"""Print BERT representations of a text or a text pair:

    python -m bertds.encode --checkpoint runs/pretrain "a crane is flying" [--pair "he just left"] [--json]

``--checkpoint`` is a finished run, a DeepSpeed checkpoint, or a Hugging Face BERT directory (e.g. one written by
``python -m bertds.export``). Only the result goes to stdout; warnings and logs go to stderr. A text longer than the
model's positions is truncated (longest first, as Hugging Face's ``truncation=True``) with a ``warning:`` line.
"""

import argparse
import json
import sys
import warnings

from bertds.encode import TruncatedInput, encode_ids, pack
from bertds.errors import run_cli

SHOWN_ELEMENTS = 8  # of the <cls> vector, in the plain-text output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", help="the (first) text")
    parser.add_argument("--pair", help="a second text: encodes <cls> text <sep> pair <sep> with segments 0/1")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="finished run directory, DeepSpeed checkpoint or Hugging Face BERT directory",
    )
    parser.add_argument("--json", action="store_true", help="print tokens, segments and all vectors as JSON")
    args = parser.parse_args(argv)
    return run_cli(lambda: show(args))


def show(args: argparse.Namespace) -> None:
    from bertds.export import load_any

    model, vocab = load_any(args.checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedInput)
        ids, segments = pack(vocab, args.text, args.pair, model.config.max_position_embeddings)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    encoded = encode_ids(model, ids, segments)[0]
    tokens = [str(vocab.tokenizer.id_to_token(i)) for i in ids]  # every id is the vocabulary's
    if args.json:
        print(
            json.dumps(
                {"tokens": tokens, "segments": segments, "shape": [1, *encoded.shape], "vectors": encoded.tolist()}
            )
        )
        return
    print(f"tokens: {' '.join(tokens)}")
    print(f"shape: {tuple([1, *encoded.shape])}")
    shown = ", ".join(f"{x:.4f}" for x in encoded[0, :SHOWN_ELEMENTS].tolist())
    print(f"{tokens[0]} vector[:{SHOWN_ELEMENTS}]: [{shown}, ...]")


if __name__ == "__main__":
    sys.exit(main())
