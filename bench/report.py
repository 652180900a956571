"""docs/benchmarks.md is shared by every benchmark: each owns the text between its markers."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
EMPTY = "# Benchmarks\n\nNumbers measured with `bench/`; each section names its command.\n"


def write_section(name: str, section: str, path: Path = DOC) -> None:
    """Replace only the text between `<!-- bench:NAME -->` markers (or append it)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{section.strip()}\n{end}"
    text = path.read_text() if path.exists() else EMPTY
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(name: str, section: str, write: bool) -> None:
    """Prints `section` after a blank line and, with `write`, puts it between NAME's
    markers in docs/benchmarks.md too."""
    print()
    print(section)
    if write:
        write_section(name, section)
        print(f"wrote {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    # `python bench/report.py NAME < section.md`, for benchmarks written in shell.
    import sys

    write_section(sys.argv[1], sys.stdin.read())
