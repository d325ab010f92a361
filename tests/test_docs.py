"""Every public name of every eqzoo package appears on an API page of the docs site."""

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PACKAGES = [
    "eqzoo",
    "eqzoo.nn",
    "eqzoo.models",
    "eqzoo.train",
    "eqzoo.data",
    "eqzoo.generation",
    "eqzoo.sciml",
    "eqzoo.bayes",
]


def _documented() -> set[str]:
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    return set(re.findall(r"^:::\s+([\w.]+)", text, flags=re.M))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_on_an_api_page(package):
    module = importlib.import_module(package)
    public = getattr(module, "__all__", None)
    assert public, f"{package} must define a non-empty __all__"
    documented = _documented()
    missing = []
    for name in public:
        obj = getattr(module, name)
        if isinstance(obj, type(module)):
            continue  # a subpackage: its own names are checked separately
        # A name is documented under its own package or, for re-exports at the top level, under
        # the subpackage that defines it.
        candidates = {f"{package}.{name}"}
        home = getattr(obj, "__module__", "") or ""
        parts = home.split(".")
        for i in range(2, len(parts) + 1):
            candidates.add(".".join(parts[:i]).replace("._", ".") + f".{name}")
        candidates |= {f"{p}.{name}" for p in PACKAGES}
        if not candidates & documented:
            missing.append(name)
    assert not missing, f"public names of {package} missing from docs/api/*.md: {missing}"
