"""Every public name of `eqzoo.hf` is on its API page (tests/test_docs.py covers the other packages)."""

import re
from pathlib import Path

import eqzoo.hf

API_PAGE = Path(__file__).resolve().parents[2] / "docs" / "api" / "hf.md"


def test_every_public_name_is_documented():
    documented = set(re.findall(r"^:::\s+eqzoo\.hf\.(\w+)", API_PAGE.read_text(), flags=re.M))
    assert set(eqzoo.hf.__all__) <= documented, sorted(set(eqzoo.hf.__all__) - documented)
    assert documented <= set(eqzoo.hf.__all__), sorted(documented - set(eqzoo.hf.__all__))
