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
