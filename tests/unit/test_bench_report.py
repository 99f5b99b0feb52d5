"""bench/_report.py: a bench rewrites its own RESULTS.md section and nothing else."""

from pathlib import Path

from bench._report import write_section


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## A\n\nold a\n\n## B\n\nkeep b\n")
    write_section(path, "## A", "new a\n")
    assert path.read_text() == "# Benchmark results\n\n## A\n\nnew a\n\n## B\n\nkeep b\n"
    write_section(path, "## C", "c\n")  # absent: appended, the others untouched
    assert path.read_text().endswith("## B\n\nkeep b\n\n## C\n\nc\n")
    write_section(path, "## B", "b2\n")  # a middle section: replaced up to the next heading
    assert "keep b" not in path.read_text() and "## B\n\nb2\n\n## C" in path.read_text()
