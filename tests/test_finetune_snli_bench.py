"""bench/finetune_snli.py at toy sizes: it pretrains, fine-tunes both sides and prints the comparison row."""

import subprocess
import sys

from tests.conftest import REPO, SHARED_DATA, launcher_env


def test_bench_pretrains_on_two_ranks_and_prints_pretrained_beside_random_init_and_the_gain(
    tmp_path, wikitext_dir, cache_dir
):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "finetune_snli.py"),
            "--pretrain",
            "3:0.001",
            "--pretrain-flags",
            "--dropout 0.1 --masking dynamic --max-len 32 --eval-interval 0 --eval-examples 16",
            "--pretrain-batch",
            "8",
            "--pretrain-ranks",
            "2",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--max-pairs",
            "48",
            "--max-len",
            "32",
            "--wikitext-dir",
            str(wikitext_dir),
            "--snli-dir",
            str(SHARED_DATA / "snli"),
            "--work-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        env=launcher_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: SNLI dev" in proc.stdout and "fine-tuning 1 epochs" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| pretrain_tiny_3_")]
    assert len(rows) == 1, proc.stdout
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1] == "3"  # steps pretrained
    minutes, unit = cells[3].split()
    assert unit == "min" and 0 <= float(minutes) < 10  # the training clock of 3 steps (rounded to 0.1)
    assert 0 <= float(cells[4]) <= 1 and 0 <= float(cells[5]) <= 1  # held-out MLM / NSP accuracy
    pretrained, random_init = (float(cells[i].split()[0]) for i in (6, 7))
    assert 0 <= pretrained <= 1 and 0 <= random_init <= 1
    gain, unit = cells[8].split()
    assert unit == "points" and abs(float(gain) - 100 * (pretrained - random_init)) <= 0.15  # rounded means
    assert (tmp_path / "ft_pretrained_pretrain_tiny_3_0.001_0" / "finetune_config.json").is_file()
    assert (tmp_path / "ft_random_init_pretrain_tiny_3_0.001_0" / "finetune_config.json").is_file()
