"""The user-facing documents (issue 18): the README's links lead somewhere, its table lists every strategy,
it says which example to start from, and neither it nor the docstrings use internal names for papers."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT

import lightning_commsgd as lc
from lightning_commsgd.registry import ENTRIES
from lightning_commsgd.strategies import ProcessGroupStrategy

README = REPO_ROOT / "README.md"
GUIDE = REPO_ROOT / "docs" / "guide.md"
DOCS = [README, *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "benchmarks" / "README.md"]


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    nxt = text.find("\n### ", start + len(heading))
    stops = [i for i in (end, nxt) if i != -1]
    return text[start : min(stops) if stops else len(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_lead_to_files_that_ship(doc):
    text = doc.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in local if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to files that do not ship: {missing}"


def test_every_mention_of_the_algorithms_document_names_the_shipped_file():
    assert (REPO_ROOT / "docs" / "ALGORITHMS.md").is_file()
    files = [README, *(REPO_ROOT / "lightning_commsgd").rglob("*.py"), *(REPO_ROOT / "tests").glob("*.py")]
    bare = [
        f"{path.relative_to(REPO_ROOT)}: {line.strip()}"
        for path in files
        for line in path.read_text().splitlines()
        if re.search(r"(?<![/\w])ALGORITHMS\.md", line) and path.name != "test_docs.py"
    ]
    assert not bare, "mentions of ALGORITHMS.md without its folder (docs/):\n" + "\n".join(bare)


def test_no_internal_names_for_the_papers():
    """"seed 003" meant a paper in the project's own notes; users read the papers' names."""
    files = [*DOCS, *(REPO_ROOT / "lightning_commsgd").rglob("*.py")]
    internal = re.compile(r"\b[Ss]eeds? ?0\d\d\b|\bseeds/")
    hits = [
        f"{path.relative_to(REPO_ROOT)}: {line.strip()}"
        for path in files
        for line in path.read_text().splitlines()
        if internal.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_the_strategy_table_lists_every_strategy():
    table = _section(README.read_text(), "## Strategies")
    # the named strategies (CommunicationStrategy's) and the parameter-server family, their sibling on the
    # process base
    base = ProcessGroupStrategy
    strategies = [name for name, obj in vars(lc).items() if isinstance(obj, type) and issubclass(obj, base)]
    assert "OverlapLocalSGDStrategy" in strategies and "KSyncSGDStrategy" in strategies
    bases = ("CommunicationStrategy", "ParameterServerStrategy")  # the generic forms, described in the text
    missing = [name for name in strategies if name not in bases and f"`{name}`" not in table]
    assert not missing, f"not in the README's strategy table: {missing}"
    registered = [f"`{name}`" for name in ENTRIES]
    assert all(name in table for name in registered), "every registered name is in the table"


def test_readme_says_which_example_to_start_from():
    text = README.read_text()
    assert "copy `examples/digits/train.py`" in text
    assert (REPO_ROOT / "examples" / "digits" / "train.py").is_file()


def test_readme_has_the_quick_starts_a_user_looks_for():
    text = README.read_text()
    quick_starts = ("**Lightning Trainer.**", "**LightningCLI.**", "**Lightning Fabric.**", "**Plain PyTorch")
    assert all(heading in text for heading in quick_starts)
    assert "make demo" in text and "make test" in text
    assert len(text) < 20_000, "the README is for users; measurements belong in benchmarks/README.md"


def test_the_guide_says_compressors_act_on_the_whole_model_as_one_flat_vector():
    section = _section(GUIDE.read_text(), "## Compressed communication")
    assert "the whole model as one flat vector" in section
    assert "an exact zero" in section and "lowest index" in section
