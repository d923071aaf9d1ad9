"""One tiny pretraining run per test session, shared by the after-pretraining tests (encode, tasks)."""

from pathlib import Path

# lr 1e-3 rather than the recipe's 0.01: a few steps at 0.01 collapse every position onto the same vector, which
# would make the context and fine-tuning tests meaningless.
PRETRAIN_ARGS = ("--max-steps", "10", "--batch-size", "128", "--lr", "1e-3", "--no-wandb")


def tiny_pretrained_run(launch, wikitext_dir: Path, tmp_path_factory) -> Path:
    """The output directory of ``launcher/pretrain.py`` run once for the session (reused from disk afterwards)."""
    output_dir = tmp_path_factory.getbasetemp() / "tiny-pretrained"
    if not (output_dir / "model.pt").is_file():
        result = launch(
            "pretrain.py",
            "--data-dir",
            str(wikitext_dir),
            "--output-dir",
            str(output_dir),
            *PRETRAIN_ARGS,
            "--overwrite",
        )
        assert result.returncode == 0, result.log[-3000:]
    return output_dir
