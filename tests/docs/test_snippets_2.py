"""The guides' python blocks, part 2 of the pages (part 1, and the check that the parts cover
every page, are in `test_snippets.py`; the directives and the runner in `_snippets.py`)."""

import pytest

from . import _snippets

PAGES = _snippets.part(1)


@pytest.fixture(scope="module")
def page_results(tmp_path_factory):
    """Runs this part's pages in one fresh process."""
    return _snippets.run_pages(PAGES, tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_snippets_run(page, page_results):
    results, log = page_results
    assert page.name in results, f"{page.name} was not reached: the process died.\n{log}"
    assert results[page.name] is None, results[page.name]
