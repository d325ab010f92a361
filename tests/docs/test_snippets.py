"""Every ```python block of the guides (docs/*.md) runs, so the snippets users copy cannot drift
from the code: part 1 of the pages here, part 2 in `test_snippets_2.py`, so that CI's two pytest
workers (`--dist loadfile` hands out whole files) share them. The directives and the runner are
in `_snippets.py`.

Run one page by hand with `python tests/docs/test_snippets.py docs/hf.md`.
"""

from pathlib import Path

if __name__ == "__main__":
    import runpy

    runpy.run_path(str(Path(__file__).with_name("_snippets.py")), run_name="__main__")

import pytest  # noqa: E402

from . import _snippets  # noqa: E402

PAGES = _snippets.part(0)


def test_every_guide_with_code_is_run():
    every = _snippets.pages()
    assert len(every) >= 14, [p.name for p in every]
    for page in every:
        _snippets.parse(page)  # raises DirectiveError for a malformed directive
    parts = [_snippets.part(i) for i in range(_snippets.PARTS)]
    assert sorted(p for ps in parts for p in ps) == every, "each page in exactly one part"
    assert all(parts), [[p.name for p in ps] for ps in parts]


@pytest.fixture(scope="module")
def page_results(tmp_path_factory):
    """Runs this part's pages in one fresh process."""
    return _snippets.run_pages(PAGES, tmp_path_factory.mktemp("docs"))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_snippets_run(page, page_results):
    results, log = page_results
    assert page.name in results, f"{page.name} was not reached: the process died.\n{log}"
    assert results[page.name] is None, results[page.name]
