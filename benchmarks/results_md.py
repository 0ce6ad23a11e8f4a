"""benchmarks/RESULTS.md holds one section per benchmark run; each script replaces only its own."""

from pathlib import Path


def write_section(path: Path, title: str, section: str):
    """Replace the section with this title if present (a rerun), else append it; other sections stay."""
    text = path.read_text() if path.exists() else ""
    if title + "\n" in text:
        before, _, rest = text.partition(title + "\n")
        nxt = rest.find("\n# ")
        after = rest[nxt + 1:] if nxt >= 0 else ""
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section if text else section
    path.write_text(text)
