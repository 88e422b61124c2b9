"""The method reference in docs/ is generated from the registry and must be current."""

from pathlib import Path

from mergelab.methods import list_methods
from mergelab.methods.docs import methods_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def test_methods_reference_is_current():
    expected = methods_markdown(list_methods()) + "\n"
    assert DOCS.read_text() == expected, "regenerate: mergelab methods --markdown > docs/methods.md"


def test_every_method_cites_a_paper_and_describes_its_parameters():
    for method in list_methods():
        assert method.url.startswith("http"), method.name
        assert method.paper, method.name
        for param in method.params:
            assert param.description, (method.name, param.name)


def test_every_relative_link_in_the_docs_resolves_inside_the_repository():
    """Markdown links in README.md and docs/ that are not URLs point at files of this
    repository (anchors ignored), never outside it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in link.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor on the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(root) or not path.exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    assert broken == []


def test_readme_layout_names_every_package_and_module_of_the_library():
    """The README's layout section lists each subpackage (`name/`) and top-level module
    (`name.py`) of src/mergelab, so a new one cannot land undescribed."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    layout = readme.read_text().split("## Layout", 1)[1].split("```")[1]
    listed = set(re.findall(r"\b([a-z_]+/)", layout)) | set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    library = root / "src" / "mergelab"
    present = {p.name + "/" for p in library.iterdir() if (p / "__init__.py").is_file()}
    present |= {p.name for p in library.glob("*.py") if p.name != "__init__.py"}
    assert sorted(present - listed) == [], f"add them to the layout section of {readme.name}"
