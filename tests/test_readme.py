"""The README's Layout table names exactly the modules and scripts that exist."""

import re

from tests.conftest import REPO

LISTED = (".py", ".sh", ".sbatch", ".example")
FOLDERS = ("bertds", "bench", "launcher")


def layout_files() -> set[str]:
    """The files the Layout table names: each row's folder joined with the file names in its description."""
    section = (REPO / "README.md").read_text().split("\n## Layout\n")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([\w/]+)/` \| (.*) \|$", section, re.M)
    return {
        f"{folder}/{name}"
        for folder, what in rows
        if folder.split("/")[0] in FOLDERS
        for name in re.findall(r"`([\w/]+(?:\.py|\.sh|\.sbatch|\.example))`", what)
    }


def test_layout_names_every_module_and_script_and_nothing_else():
    existing = {
        str(p.relative_to(REPO))
        for folder in FOLDERS
        for p in (REPO / folder).rglob("*")
        if p.suffix in LISTED and "__pycache__" not in p.parts
    }
    package_inits = {f for f in existing if f.endswith("/__init__.py") and not f.startswith("bertds/encode/")}
    assert layout_files() == existing - package_inits
