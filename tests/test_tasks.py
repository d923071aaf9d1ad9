import json

import pytest
import torch

from bertds import Vocab
from bertds.errors import UserError
from bertds.tasks import LABELS, TokenizedPairs, load_classifier, load_split, read_nli_file
from bertds.tasks.finetune import FinetuneConfig, RankShard
from bertds.tasks.synthetic import write_synthetic_snli
from tests.conftest import REPO, SHARED_DATA, load_launcher
from tests.pretrained_run import tiny_pretrained_run

SNLI_DIR = SHARED_DATA / "snli"
# The same three pairs (and one without consensus) in SNLI's three release formats.
PAIRS = [
    ("neutral", "( ( Two women ) ( are ( embracing ) ) )", "( The sisters ( are hugging ) )"),
    ("-", "( A man )", "( ( A person ) ( is outside ) )"),
    ("entailment", "( ( Two women ) ( are ( embracing ) ) )", "( Two women ( are ( holding packages ) ) )"),
    ("contradiction", "( A man ( is sleeping ) )", "( A man ( is running ) )"),
]
TXT_HEADER = [
    "gold_label",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "captionID",
    "pairID",
    "label1",
]


def unparse(parse: str) -> str:
    return " ".join(parse.replace("(", " ").replace(")", " ").split())


def write_formats(directory):
    directory.mkdir(exist_ok=True)
    (directory / "snli_1.0_train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "gold_label": g,
                    "sentence1_binary_parse": p,
                    "sentence2_binary_parse": h,
                    "sentence1": unparse(p) + "!",
                    "sentence2": unparse(h) + "!",
                }
            )
            + "\n"
            for g, p, h in PAIRS
        )
    )
    rows = ["\t".join(TXT_HEADER)] + [
        "\t".join([g, p, h, "(ROOT)", "(ROOT)", "raw", "raw", "1", "2", g]) for g, p, h in PAIRS
    ]
    (directory / "snli_1.0_dev.txt").write_text("\n".join(rows) + "\n")
    (directory / "test.tsv").write_text(
        "label\tpremise\thypothesis\n" + "".join(f"{g}\t{unparse(p)}\t{unparse(h)}\n" for g, p, h in PAIRS)
    )
    return directory


def test_the_three_formats_read_the_same_pairs_and_drop_no_consensus(tmp_path):
    directory = write_formats(tmp_path / "snli")
    splits = [load_split(directory, split) for split in ("train", "dev", "test")]
    for pairs in splits:
        assert pairs.labels == [LABELS.index("neutral"), LABELS.index("entailment"), LABELS.index("contradiction")]
        assert pairs.premises[0] == "Two women are embracing"  # the binary parse without brackets (d2l)
        assert pairs.hypotheses == splits[0].hypotheses and pairs.premises == splits[0].premises


@pytest.mark.parametrize(
    "name,content,line,problem",
    [
        (
            "test.tsv",
            "label\tpremise\thypothesis\nneutral\ta\tb\nentailment\tonly two fields\n",
            3,
            "2 tab-separated fields",
        ),
        ("test.tsv", "neutral\ta\tb\nmaybe\ta\tb\n", 2, "unknown label 'maybe'"),
        (
            "snli_1.0_test.jsonl",
            '{"gold_label": "neutral", "sentence1": "a", "sentence2": "b"}\n{"gold_label": \n',
            2,
            "not valid JSON",
        ),
        (
            "snli_1.0_test.txt",
            "gold_label\tsentence1\tsentence2\nneutral\ta\tb\nneutral\ta\n",
            3,
            "2 tab-separated fields where the header has 3",
        ),
    ],
)
def test_a_bad_row_names_the_file_and_line(tmp_path, name, content, line, problem):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=f"^{tmp_path / name} line {line}: {problem}.*; fix or remove that line$"):
        load_split(tmp_path, "test")


def test_a_missing_split_names_the_splits_that_exist(tmp_path):
    write_formats(tmp_path)
    (tmp_path / "snli_1.0_train.jsonl").unlink()
    with pytest.raises(UserError, match="no train split in .* the splits there are dev, test"):
        load_split(tmp_path, "train")


def word_vocab() -> Vocab:
    return Vocab.train_word_level(["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 v1 v2 v3"], min_freq=1)


def test_over_long_pairs_are_cut_longest_first_and_packed_as_cls_p_sep_h_sep(tmp_path):
    (tmp_path / "test.tsv").write_text("entailment\tw1 w2 w3 w4 w5 w6 w7 w8 w9 w10\tv1 v2 v3\nneutral\tw1\tv1 v2\n")
    vocab = word_vocab()
    data = TokenizedPairs(load_split(tmp_path, "test"), vocab, max_len=10)
    premise, hypothesis, label = data[0]
    assert (len(premise), len(hypothesis), label) == (4, 3, 0)  # 13 words cut to 7 from the longer premise
    batch = data.collate([data[0], data[1]])

    def ids(words: str) -> list[int]:
        return vocab.token_ids(words.split())

    assert batch["tokens"][0].tolist() == [
        vocab.cls_id,
        *ids("w1 w2 w3 w4"),
        vocab.sep_id,
        *ids("v1 v2 v3"),
        vocab.sep_id,
    ]
    assert batch["segments"][0].tolist() == [0] * 6 + [1] * 4
    assert (
        batch["tokens"][1].tolist()
        == [vocab.cls_id, *ids("w1"), vocab.sep_id, *ids("v1 v2"), vocab.sep_id] + [vocab.pad_id] * 4
    )
    assert batch["valid_len"].tolist() == [10, 6] and batch["label"].tolist() == [0, 1]


def test_rank_shards_cover_an_eval_set_once_with_equal_batch_counts(tmp_path):
    (tmp_path / "test.tsv").write_text("".join(f"{LABELS[i % 3]}\tw{i % 9 + 1}\tv1\n" for i in range(7)))
    data = TokenizedPairs(load_split(tmp_path, "test"), word_vocab(), max_len=16)
    shards = [RankShard(data, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {3}  # 7 pairs over 3 ranks: 3, 2 (+1 padding), 2 (+1 padding)
    weights = [s.collate([s[i] for i in range(len(s))])["weight"] for s in shards]
    assert sum(w.sum().item() for w in weights) == 7


def test_synthetic_pairs_are_written_in_snli_jsonl_and_named_synthetic(wikitext_dir, tmp_path):
    directory = write_synthetic_snli(wikitext_dir, tmp_path, {"train": 600, "test": 300})
    train = load_split(directory, "train")
    assert 550 < len(train) < 600  # ~2% no-consensus rows dropped
    assert train.source.startswith("synthetic pair task (not SNLI)")
    assert {LABELS[i] for i in train.labels} == set(LABELS)
    for premise, hypothesis, label in zip(train.premises, train.hypotheses, train.labels):
        if LABELS[label] == "entailment":
            assert hypothesis in premise
        if LABELS[label] == "contradiction":
            assert hypothesis.split()[1] == "not"
    assert read_nli_file(directory / "snli_1.0_test.jsonl").labels == load_split(directory, "test").labels


# --- fine-tuning through the launcher ---------------------------------------------------------------------------


def nli_data(wikitext_dir, tmp_path) -> tuple[list[str], str]:
    """Real SNLI rows where ../shared/data/snli exists (no train split there: dev trains, test is held out);
    otherwise the synthetic task."""
    if (SNLI_DIR / "dev.tsv").is_file():
        return ["--data-dir", str(SNLI_DIR), "--train-split", "dev", "--eval-splits", "test"], "SNLI dev -> test"
    directory = write_synthetic_snli(wikitext_dir, tmp_path / "synthetic", {"train": 2040, "test": 1020})
    return ["--data-dir", str(directory), "--train-split", "train", "--eval-splits", "test"], "synthetic pair task"


def test_finetuning_a_briefly_pretrained_tiny_model_beats_chance(launch, wikitext_dir, tmp_path_factory, tmp_path):
    run_dir = tiny_pretrained_run(launch, wikitext_dir, tmp_path_factory)
    data_args, data_name = nli_data(wikitext_dir, tmp_path)
    output_dir = tmp_path / "finetune"
    # ~2,000 training pairs, 5 epochs of 63 steps (batch 32) = 315 steps; 1,000 held-out pairs.
    result = launch(
        "finetune_snli.py",
        "--checkpoint",
        str(run_dir),
        *data_args,
        "--max-train-pairs",
        "2000",
        "--max-eval-pairs",
        "1000",
        "--batch-size",
        "32",
        "--lr",
        "5e-4",
        "--epochs",
        "5",
        "--output-dir",
        str(output_dir),
        nproc=1,
    )
    assert result.returncode == 0, result.log[-3000:]
    saved = json.loads((output_dir / "finetune_config.json").read_text())["result"]
    accuracy = saved["final"]["test_acc"]
    assert accuracy > 0.40, f"{data_name}: test accuracy {accuracy:.3f} after fine-tuning\n{result.log[-2000:]}"
    assert saved["final"]["step"] == 5 * 63

    classifier, vocab, info = load_classifier(output_dir / "best")
    assert not any(k.startswith(("mlm.", "nsp.")) for k in classifier.state_dict())
    assert info["labels"] == list(LABELS) and info["epoch"] == saved["best"]["epoch"]
    # The saved best model reproduces its reported accuracy on the same held-out pairs.
    split = data_args[data_args.index("--eval-splits") + 1]
    held_out = TokenizedPairs(load_split(data_args[1], split).sample(1000, seed=0), vocab, 128)
    batch = held_out.collate([held_out[i] for i in range(len(held_out))])
    with torch.no_grad():
        predictions = classifier(batch["tokens"], batch["segments"], batch["valid_len"]).argmax(-1)
    reproduced = (predictions == batch["label"]).float().mean().item()
    assert abs(reproduced - saved["best"]["test_acc"]) < 1e-6


def test_finetuning_without_a_train_split_exits_2(launch, tmp_path):
    data_dir = write_formats(tmp_path / "data")
    (data_dir / "snli_1.0_train.jsonl").unlink()
    result = launch("finetune_snli.py", "--checkpoint", str(tmp_path / "run"), "--data-dir", str(data_dir))
    assert result.returncode == 2, result.log[-2000:]
    assert f"error: no train split in {data_dir}" in result.stderr


def test_finetuning_flags_build_the_config_and_name_exactly_one_model():
    finetune = load_launcher("finetune_snli.py")
    cfg = finetune.parse_args(["--checkpoint", "run", "--train-split", "dev", "--eval-splits", "test", "--lr", "5e-4"])
    assert cfg == FinetuneConfig(
        deepspeed_config=str(REPO / "ds_configs" / "finetune_snli.json"),
        checkpoint="run",
        train_split="dev",
        eval_splits=["test"],
        lr=5e-4,
    )
    assert finetune.parse_args(["--init-from-hf", "hf"]).eval_splits == ["dev", "test"]
    for args in ([], ["--checkpoint", "run", "--init-from-hf", "hf"]):
        with pytest.raises(UserError, match="pass exactly one of --checkpoint RUN"):
            finetune.parse_args(args)


# --- the fine-tuned classifier leaves bertds ----------------------------------------------------------------------


def saved_classifier(tmp_path):
    """A fine-tuning run directory (finetune_config.json, best/) holding a classifier with every weight random."""
    from bertds import BertForPreTraining, get_config
    from bertds.tasks import BertClassifier, save_classifier

    vocab = Vocab.train_word_level(["a man is sleeping", "a man is running", "two women are embracing"], min_freq=1)
    torch.manual_seed(0)
    classifier = BertClassifier(
        BertForPreTraining(get_config("tiny", vocab_size=len(vocab), pad_token_id=vocab.pad_id)).bert, len(LABELS)
    )
    with torch.no_grad():
        for p in classifier.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    info = {
        "labels": list(LABELS),
        "max_len": 32,
        "epoch": 2,
        "selected_on": "dev",
        "accuracies": {"train_acc": 0.7, "dev_acc": 0.625, "test_acc": 0.5},
        "eval_sources": {"dev": "SNLI dev"},
    }
    save_classifier(classifier.state_dict(), classifier.bert.config, vocab, info, tmp_path / "ft" / "best")
    (tmp_path / "ft" / "finetune_config.json").write_text(
        json.dumps({"finetune": {"epochs": 3, "lr": 1e-4}, "result": {"train_source": "SNLI train (local)"}})
    )
    return classifier.eval(), vocab


def test_a_fine_tuned_classifier_exports_to_bert_for_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    from bertds.encode import pack
    from bertds.export import main as export_main
    from tests.hf_loading import LEGACY_PYTHON, legacy_report

    classifier, vocab = saved_classifier(tmp_path)
    assert export_main(["--checkpoint", str(tmp_path / "ft" / "best"), "--out", str(tmp_path / "hf")]) == 0
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf_model).__name__ == "BertForSequenceClassification"
    assert hf_model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert hf_model.config.label2id == {"entailment": 0, "neutral": 1, "contradiction": 2}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.model_max_length == 32
    pairs = [("a man is sleeping", "a man is running"), ("two women are embracing", "a man")]
    batch = tokenizer([p for p, _ in pairs], [h for _, h in pairs], padding=True, return_tensors="pt")
    packed = [pack(vocab, p, h) for p, h in pairs]
    assert [ids for ids, _ in packed] == [
        row[:n].tolist() for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(-1))
    ]
    with torch.no_grad():
        hf = hf_model(**batch).logits
        ours = classifier(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"].sum(-1))
    assert ours.std() > 0.1  # logits that a mis-mapped weight would visibly change
    torch.testing.assert_close(hf, ours, atol=1e-5, rtol=0)
    if LEGACY_PYTHON:  # the oldest supported transformers loads it alike
        request = {"texts": [list(pair) for pair in pairs], "model": "BertForSequenceClassification"}
        report = legacy_report(tmp_path / "hf", request)["model"]
        assert report["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
        torch.testing.assert_close(torch.tensor(report["logits"]["logits"]), ours, atol=1e-5, rtol=0)
    card = (tmp_path / "hf" / "README.md").read_text()
    for fact in (
        "pipeline_tag: text-classification",
        "| labels | entailment, neutral, contradiction |",
        "| dev accuracy | 0.6250 (SNLI dev) |",
        "| fine-tuned on | SNLI train (local) |",
        "| epochs | 3 |",
    ):
        assert fact in card, fact


def test_exporting_a_fine_tuning_run_or_foreign_weights_is_one_error_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    from bertds.export import main as export_main

    classifier, vocab = saved_classifier(tmp_path)
    assert export_main(["--checkpoint", str(tmp_path / "ft"), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'ft'} is a fine-tuning run; pass its best/ directory ({tmp_path / 'ft' / 'best'})"
    )
    (tmp_path / "ft" / "best" / "classifier.json").unlink()  # model.pt now holds a classifier no file describes
    assert export_main(["--checkpoint", str(tmp_path / "ft" / "best"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: {tmp_path / 'ft' / 'best' / 'model.pt'} holds no bertds BertForPreTraining weights"
    )
