"""Resolving corpora (bertds/data/corpus.py): local files, WikiText names, the hub, bad paths."""

import pytest

from bertds.data import (
    resolve_corpus,
)
from bertds.data.corpus import HUB_DATASET
from bertds.data.d2l import paragraph_sentences
from bertds.errors import UserError


def test_hub_and_local_directory_give_the_same_paragraphs(wikitext_dir, monkeypatch):
    import datasets

    lines = (wikitext_dir / "wiki.valid.tokens").read_text().splitlines(keepends=True)
    # The hub's wikitext rows: each line with its trailing newline, empty lines as "".
    hub_rows = datasets.Dataset.from_dict({"text": ["" if not line.strip() else line for line in lines]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub_rows)
    monkeypatch.delenv("BERTDS_DATA_DIR", raising=False)
    from_hub = paragraph_sentences(resolve_corpus(None, None, "validation"))
    local = paragraph_sentences(resolve_corpus(None, str(wikitext_dir), "validation"))
    assert from_hub == local and len(local) > 1000


def test_missing_data_dir_names_the_flag(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass --data-dir"):
        resolve_corpus(None, str(tmp_path / "nowhere"))


def test_missing_and_empty_files_are_user_errors(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text("")
    with pytest.raises(UserError, match="is empty"):
        resolve_corpus(None, str(tmp_path), "train")
    with pytest.raises(UserError, match="wiki.valid.tokens is missing"):
        resolve_corpus(None, str(tmp_path), "validation")


def test_data_dir_from_environment(tmp_path, monkeypatch, wikitext_dir):
    monkeypatch.setenv("BERTDS_DATA_DIR", str(wikitext_dir))
    assert resolve_corpus(None).files == (wikitext_dir.resolve() / "wiki.train.tokens",)
    monkeypatch.delenv("BERTDS_DATA_DIR")
    assert resolve_corpus(None).hub == HUB_DATASET  # the hub


def test_wikitext_documents_are_title_sections_and_hub_matches_local(wikitext_dir, monkeypatch):
    local = resolve_corpus([str(wikitext_dir / "wiki.valid.tokens")])
    documents = [r["text"] for r in local.documents()]
    assert all(doc.startswith("= ") and not doc.startswith("= =") for doc in documents) and len(documents) > 50
    lines = (wikitext_dir / "wiki.valid.tokens").read_text().splitlines(keepends=True)
    hub_rows = [{"text": "" if not line.strip() else line} for line in lines]
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(hub_rows))
    hub = resolve_corpus(["hub:Salesforce/wikitext:wikitext-2-v1"], split="validation")
    assert hub.wikitext and [r["text"] for r in hub.documents(streaming=True)] == documents


def test_wikitext_names_resolve_to_local_files_or_the_hub(wikitext_dir, monkeypatch):
    monkeypatch.delenv("BERTDS_DATA_DIR", raising=False)
    assert resolve_corpus(["wikitext-103"]).hub == ("Salesforce/wikitext", "wikitext-103-v1")
    assert resolve_corpus(["wikitext-2-raw"]).hub == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert resolve_corpus(["wikitext-2"], str(wikitext_dir), "validation").files == (
        wikitext_dir / "wiki.valid.tokens",
    )
    with pytest.raises(UserError, match="wiki.train.raw is missing"):
        resolve_corpus(["wikitext-2-raw"], str(wikitext_dir))
