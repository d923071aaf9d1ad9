"""launcher/pretrain.py --init-from-hf: continue pretraining from a Hugging Face BERT directory."""

import json

import pytest

from bertds.engine.tracking import read_metrics
from tests.pretrained_run import tiny_pretrained_run

pytest.importorskip("transformers")  # the hf extra; .ci/run installs it


@pytest.fixture(scope="module")
def exported(launch, wikitext_dir, tmp_path_factory):
    import bertds.export

    run = tiny_pretrained_run(launch, wikitext_dir, tmp_path_factory)
    out = tmp_path_factory.mktemp("hf-export")
    assert bertds.export.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    return run, out


def test_pretraining_continues_from_an_exported_hugging_face_directory(exported, launch, wikitext_dir, tmp_path):
    run, hf_dir = exported
    common = [
        "--data-dir",
        str(wikitext_dir),
        "--max-steps",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "1e-3",
        "--log-interval",
        "1",
        "--no-wandb",
    ]
    from_hf = launch("pretrain.py", *common, "--init-from-hf", str(hf_dir), "--output-dir", str(tmp_path / "hf"))
    scratch = launch("pretrain.py", *common, "--output-dir", str(tmp_path / "scratch"))
    assert from_hf.returncode == 0 and scratch.returncode == 0, from_hf.log[-3000:] + scratch.log[-2000:]
    first_hf, first_scratch = read_metrics(tmp_path / "hf")[0], read_metrics(tmp_path / "scratch")[0]
    assert first_hf["mlm_loss"] < first_scratch["mlm_loss"] - 1.0  # the pretrained weights were loaded
    assert first_hf["mlm_loss"] <= read_metrics(run)[-1]["mlm_loss"] + 0.5
    # The run records the architecture it loaded, not the --model preset it did not use.
    loaded = f"2 layers, hidden 128, 2 heads, FFN 256 from {hf_dir}"
    assert json.loads((tmp_path / "hf" / "train_config.json").read_text())["train"]["model"] == loaded
    assert f"model: {loaded}, " in from_hf.stdout
