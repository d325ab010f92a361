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
    "eqzoo.checkpoint",
    "eqzoo.sharding",
    "eqzoo.perf",
    "eqzoo.hf",
    "eqzoo.peft",
    "eqzoo.quant",
    "eqzoo.sciml",
    "eqzoo.bayes",
    "eqzoo.diffusion",
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
        # Documented under this package, or under another eqzoo package that exports the same
        # object (e.g. eqzoo.generate is documented as eqzoo.generation.generate).
        homes = {f"{package}.{name}"}
        for other in PACKAGES:
            try:
                mod = importlib.import_module(other)
            except ImportError:
                continue
            if getattr(mod, name, None) is obj:
                homes.add(f"{other}.{name}")
        if not homes & documented:
            missing.append(name)
    assert not missing, f"public names of {package} missing from docs/api/*.md: {missing}"


def test_api_pages_name_only_real_objects():
    """A `::: name` line that names nothing would break the strict docs build; catch it here."""
    bad = []
    for target in sorted(_documented()):
        module_name, _, attr = target.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            try:
                module = importlib.import_module(target)
                continue
            except ImportError:
                bad.append(target)
                continue
        if not hasattr(module, attr):
            bad.append(target)
    assert not bad, f"docs name objects that do not exist: {bad}"
