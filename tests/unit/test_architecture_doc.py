"""docs/architecture.md is the design of record: every `architecture.md "Section"` the repository cites is a
heading there, and nothing cites a design document outside the repository."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r'architecture\.md,? "([^"]+)"')


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    return [ROOT / n for n in names if Path(n).suffix in {".py", ".md", ".toml", ".yaml", ".sh", ""} and (ROOT / n).is_file()]


def test_every_cited_section_of_the_architecture_doc_exists():
    headings = {line.lstrip("#").strip() for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()
                if line.startswith("#")}
    cited = {}
    for path in _tracked_text_files():
        if path == Path(__file__):  # its docstring shows the form
            continue
        for title in CITATION.findall(" ".join(path.read_text(errors="ignore").split())):
            cited.setdefault(title, []).append(str(path.relative_to(ROOT)))
    assert len(cited) >= 5, cited  # the code does cite it
    missing = {title: where for title, where in cited.items() if title not in headings}
    assert missing == {}


def test_nothing_cites_a_design_document_outside_the_repository():
    offenders = [str(path.relative_to(ROOT)) for path in _tracked_text_files()
                 if path != Path(__file__) and re.search(r"\bdesign\.md\b|\.\./shared\b|/work/shared",
                                                          path.read_text(errors="ignore"))]
    assert offenders == []
