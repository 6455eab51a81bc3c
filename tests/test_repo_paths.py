"""The repository names no folder of the machine it was made on (results files record commands with placeholders)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE = ("/tmp/", "/work/", "/root/", "/home/")
TEXT = {".md", ".json", ".py", ".sh", ".toml", ".txt", ".yaml", ".yml", ".cfg", ".csv"}


def test_no_results_file_script_or_doc_names_a_folder_of_this_machine():
    folders = [ROOT / d for d in ("experiments", "docs", "scripts", "benchmarks", "src")]
    files = [ROOT / "README.md", *(p for d in folders if d.is_dir() for p in d.rglob("*") if p.suffix in TEXT)]
    found = [
        f"{p.relative_to(ROOT)}: {bad}"
        for p in files
        if p.is_file()
        for bad in MACHINE
        if bad in p.read_text(errors="replace")
    ]
    assert len(files) > 50
    assert not found, found
