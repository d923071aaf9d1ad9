import importlib.util
import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Markers (registered in pyproject.toml) from what a test uses, so that the fast tests run with
#   python -m pytest tests -m "not slow and not multiprocess"
MULTIPROCESS_FIXTURES = {"launch", "prepare_cli"}  # launched commands (deepspeed launcher, torchrun, command lines)
ENGINE_FIXTURES = {"process_group"}  # DeepSpeed engines built in the test process
HF_FILES = {"test_export.py", "test_pretrain_from_hf.py"}  # import transformers or need its exports throughout
HF_WORDS = ("transformers", "export_main", "save_hf", "_hf")


def runs_a_subprocess(function) -> bool:
    """The test, or a function of its module that it calls, starts a subprocess."""
    source = inspect.getsource(function)
    helpers = [
        f
        for name, f in vars(inspect.getmodule(function)).items()
        if inspect.isfunction(f) and f is not function and f"{name}(" in source
    ]
    return any("subprocess." in inspect.getsource(f) for f in (function, *helpers))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        source = inspect.getsource(item.function) if isinstance(item, pytest.Function) else ""
        if fixtures & MULTIPROCESS_FIXTURES or (source and runs_a_subprocess(item.function)):
            item.add_marker(pytest.mark.multiprocess)
            item.add_marker(pytest.mark.slow)
        elif fixtures & ENGINE_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if item.path.name in HF_FILES or any(word in source for word in HF_WORDS):
            item.add_marker(pytest.mark.hf)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    path = Path(os.environ.get("BERTDS_TEST_DATA_DIR", SHARED_DATA / "wikitext-2"))
    if not (path / "wiki.train.tokens").is_file():
        pytest.fail(f"WikiText-2 not found at {path}: put ../shared/data beside the repo or set BERTDS_TEST_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One prepared-example cache for the whole session, shared with launched subprocesses."""
    return tmp_path_factory.mktemp("bertds-cache")


@pytest.fixture(scope="session")
def prepared(wikitext_dir, cache_dir):
    from bertds.data import ExampleConfig, prepare_pretraining_data, resolve_corpus

    corpus = resolve_corpus(None, str(wikitext_dir))
    return prepare_pretraining_data(corpus, ExampleConfig(max_len=64, seed=0), cache_dir)


# Set in this process by in-process engine tests; a launched child must not inherit them.
DIST_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
)


def launcher_command(script: str, *args: str, nproc: int | None = None) -> list[str]:
    """nproc=None: plain python (one rank); else the deepspeed launcher with nproc ranks."""
    if nproc is None:
        return [sys.executable, str(REPO / "launcher" / script), *args]
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(REPO / "launcher" / script),
        *args,
    ]


def torchrun_command(script: str, *args: str) -> list[str]:
    """Two ranks of ``script`` (a path) under torchrun, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        script,
        *args,
    ]


def launcher_env(cache_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    return {
        **env,
        "BERTDS_CACHE_DIR": str(cache_dir),
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        **extra,
    }


@pytest.fixture(scope="session")
def launch(cache_dir):
    """Runs a bertds launcher script to completion (see launcher_command)."""

    def run(
        script: str, *args: str, nproc: int | None = None, timeout: int = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            launcher_command(script, *args, nproc=nproc),
            cwd=REPO,
            env=launcher_env(cache_dir, **(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        result.log = result.stdout + result.stderr  # type: ignore[attr-defined]
        return result

    return run


@pytest.fixture(scope="session")
def process_group():
    """A one-rank process group in the test process, for tests that build DeepSpeed engines in-process."""
    from bertds.distributed import init_distributed

    return init_distributed()


@pytest.fixture(scope="session")
def tiny_ds_config() -> Path:
    return REPO / "ds_configs" / "tiny_cpu.json"


def load_launcher(script: str):
    """A script of launcher/ as a module, to call its main or parse_args in this process."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / "launcher" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare_cli():
    """launcher/prepare_data.py's main."""
    return load_launcher("prepare_data.py").main


def restore_masked(columns: dict) -> np.ndarray:
    """The examples' tokens (numpy columns) with every real prediction slot's label put back: the text before
    masking."""
    tokens = columns["tokens"].copy()
    rows = np.broadcast_to(np.arange(len(tokens))[:, None], columns["pred_positions"].shape)
    real = columns["mlm_weights"] > 0
    tokens[rows[real], columns["pred_positions"][real]] = columns["mlm_labels"][real]
    return tokens


def wordpiece_vocab():
    """A 12-piece BERT-style WordPiece vocabulary (lower-casing, punctuation split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from bertds import Vocab

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "crane", "##s", "are", "fly", "##ing", "driver"]
    tokenizer = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return Vocab(tokenizer, {"unk": "[UNK]", "pad": "[PAD]", "mask": "[MASK]", "cls": "[CLS]", "sep": "[SEP]"})


def as_numpy(examples):
    return {k: np.asarray(v) for k, v in examples.with_format("numpy")[:].items()}


def write_corpus(directory, lines, split_file="wiki.train.tokens"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / split_file).write_text("".join(f" {line} \n" for line in lines))
    return directory


def columns(examples):
    from bertds.data.loader import table_columns

    return table_columns(examples.data.table)


@pytest.fixture(scope="session")
def wordpiece(wikitext_dir):
    from bertds.data import Vocab, resolve_corpus
    from bertds.data.prepare import corpus_texts

    corpus = resolve_corpus([str(wikitext_dir / "wiki.train.tokens")])
    return Vocab.train_wordpiece(corpus_texts(corpus, "[UNK]"), vocab_size=8000)


def document_corpus(tmp_path, docs=30, sentences=12, name="docs.txt"):
    """Blank-line separated documents; every word of sentence s of document d is "dDsS", so any token tells
    where it came from. Sentence lengths vary from 2 to 6 words."""
    rng = np.random.default_rng(0)
    blocks = []
    for d in range(docs):
        said = [" ".join([f"d{d}s{s}"] * int(rng.integers(2, 7))) + " ." for s in range(sentences)]
        blocks.append("\n".join(" ".join(said[i : i + 3]) for i in range(0, sentences, 3)))
    path = tmp_path / name
    path.write_text("\n\n".join(blocks) + "\n")
    return path
