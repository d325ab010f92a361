"""Every ```python block of the guides (docs/*.md) runs, so the snippets users copy cannot drift
from the code.

A page is one session: its blocks run in order, in one fresh Python process (started in an empty
temporary directory), so a later block may use an earlier one's names. HTML comments directly
before a block, invisible on the site, adapt a page to CI's two CPU cores:

- `<!-- docs-test: setup ... -->`: the comment's body is Python run at that point of the page
  (define the names a snippet takes as given: a tiny exported Hugging Face folder, a dataset;
  shrink a large preset with `eqzoo.models.register_preset(..., overwrite=True)`).
- `<!-- docs-test: check ... -->`: the same, after a block: asserts that it did what the text
  around it says.
- `<!-- docs-test: replace OLD => NEW -->` (one `OLD => NEW` per line): text substituted in the
  next block only, for sizes (`num_steps=10_000 => num_steps=2`). `OLD` must occur in the block.
- `<!-- docs-test: raises ShapeError -->`: the next block must raise that exception (a class of
  that name anywhere in its MRO) from its last statement, as its comment says it does.
- `<!-- docs-test: skip (why it cannot run here) -->`: the next block is not run; the reason
  is required.

Only blocks tagged exactly ```python run. Code of other libraries, shown for comparison (the
Flax NNX blocks of migrating.md), is tagged ```py: highlighted as Python, never run.

This module holds the machinery; `test_snippets.py` and `test_snippets_2.py` each run one part
of the pages (`part`), so that CI's two pytest workers share them. Run one page by hand with
`python tests/docs/test_snippets.py docs/hf.md` (from any directory: the pages write their
files, `runs/` and the like, under a new temporary directory).
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
KINDS = ("setup", "check", "replace", "raises", "skip")


@dataclasses.dataclass
class Block:
    """One step of a page: a visible ```python block or a hidden setup comment."""

    line: int  # 1-based line of the block's first code line in the page
    code: str
    kind: str = "code"  # "code" or "setup"
    skip: str | None = None
    raises: str | None = None
    replacements: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def source(self) -> str:
        code = self.code
        for old, new in self.replacements:
            code = code.replace(old, new)
        return code


class DirectiveError(ValueError):
    pass


def parse(path: Path) -> list[Block]:
    """The page's python blocks and setup comments, in order, with their directives applied.

    **Raises:** `DirectiveError` for a malformed directive: an unknown kind, a skip without a
    reason, a `replace` whose text is not in its block, or a directive not followed by a block.
    """
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    pending: dict = {}
    where = lambda i: f"{path.name}:{i + 1}"
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("<!-- docs-test:"):
            start = i
            body, i = _comment_body(lines, i, where)
            setup = _directive(body, start, where, pending)
            if setup is not None:
                blocks.append(setup)
            i += 1
            continue
        if stripped.startswith("```python"):
            block, i = _python_block(lines, i, pending, where)
            blocks.append(block)
            pending = {}
            i += 1
            continue
        if pending and stripped:
            raise DirectiveError(f"{where(i)}: a docs-test directive must come directly before its ```python block")
        i += 1
    if pending:
        raise DirectiveError(f"{path.name}: a docs-test directive at the end of the page has no block")
    return blocks


def _comment_body(lines: list[str], i: int, where) -> tuple[str, int]:
    """The text of the `<!-- docs-test: ... -->` comment opening on line `i` (it may span
    lines), and the line it closes on."""
    start = i
    body = lines[i].strip()[len("<!-- docs-test:"):]
    while "-->" not in body:
        i += 1
        if i == len(lines):
            raise DirectiveError(f"{where(start)}: docs-test comment never closed with -->")
        body += "\n" + lines[i]
    return body[: body.index("-->")], i


def _directive(body: str, start: int, where, pending: dict) -> Block | None:
    """One directive's effect: a `setup`/`check` comment is a block of its own (returned); the
    others are recorded in `pending`, for the next ```python block."""
    match = re.match(r"\s*(\w*)(.*)", body, flags=re.S)
    kind, rest = match.group(1), match.group(2)
    if kind not in KINDS:
        raise DirectiveError(f"{where(start)}: unknown docs-test directive {kind!r}; use one of {KINDS}")
    if kind in ("setup", "check"):
        code = rest.split("\n", 1)[1] if "\n" in rest else ""
        return Block(line=start + 2, code=textwrap.dedent(code), kind="setup")
    if kind == "skip":
        reason = rest.strip()
        if not re.fullmatch(r"\(.*\S.*\)", reason, flags=re.S):
            raise DirectiveError(
                f"{where(start)}: a docs-test skip needs its reason in parentheses, "
                "e.g. <!-- docs-test: skip (needs a GPU) -->"
            )
        pending["skip"] = reason[1:-1].strip()
    elif kind == "raises":
        if not re.fullmatch(r"\w+", rest.strip()):
            raise DirectiveError(f"{where(start)}: docs-test raises takes one exception name, got {rest.strip()!r}")
        pending["raises"] = rest.strip()
    else:  # replace
        pending.setdefault("replacements", []).extend(_replacements(rest, start, where))
    return None


def _replacements(rest: str, start: int, where) -> list[tuple[str, str]]:
    """A `replace` directive's `OLD => NEW` lines as pairs."""
    pairs = []
    for entry in rest.strip().splitlines():
        if entry.strip():
            if " => " not in entry:
                raise DirectiveError(f"{where(start)}: docs-test replace lines are 'OLD => NEW', got {entry.strip()!r}")
            old, new = entry.strip().split(" => ", 1)
            pairs.append((old, new))
    return pairs


def _python_block(lines: list[str], i: int, pending: dict, where) -> tuple[Block, int]:
    """The ```python block opening on line `i`, dedented, with the `pending` directives, and
    the line of its closing fence."""
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    start = i + 1
    i += 1
    while i < len(lines) and lines[i].strip() != "```":
        i += 1
    code = textwrap.dedent("\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start:i]))
    block = Block(line=start + 1, code=code, **pending)
    for old, _ in block.replacements:
        if old not in code:
            raise DirectiveError(f"{where(start)}: docs-test replace text {old!r} is not in the block")
    return block, i


# A ChatML template of the kind Qwen's folders carry, with {% generation %} tags around replies.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_TOKENIZER = None


def tiny_hf_folder(path: str, preset: str = "tiny-llama", *, chat: bool = False, **overrides) -> None:
    """Writes a stand-in for a downloaded Hugging Face folder: a tiny random eqzoo `preset`
    exported by `eqzoo.hf.save_pretrained`, with a byte-level BPE `tokenizer.json` trained on
    `shutil`'s source, its special tokens, a `generation_config.json` and, with `chat`, a ChatML
    template. Nothing is downloaded; torch is not imported."""
    global _TOKENIZER
    import json
    import shutil

    import jax
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import eqzoo
    import eqzoo.hf

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    if _TOKENIZER is None:  # trained once per process
        _TOKENIZER = Tokenizer(models.BPE())
        _TOKENIZER.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        _TOKENIZER.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        _TOKENIZER.train_from_iterator(Path(shutil.__file__).read_text().splitlines(), trainer)
    tokenizer = _TOKENIZER
    ids = {name: tokenizer.token_to_id(name) for name in specials}
    model = eqzoo.models.create(preset, key=jax.random.key(0), vocab_size=tokenizer.get_vocab_size(), **overrides)
    eqzoo.hf.save_pretrained(model, path, extra_config={
        "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"],
        "pad_token_id": ids["<|pad|>"]})
    folder = Path(path)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}
    if chat:
        config = config | {"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation |= {"do_sample": True, "temperature": 0.6, "top_p": 0.9}  # as Llama 3's file has
    (folder / "generation_config.json").write_text(json.dumps(generation))


def pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())


def run_page(path: Path) -> str | None:
    """Runs the page's blocks in one fresh namespace, in the current directory.

    **Returns:** `None` if every block did what it should, else the failure (with its traceback,
    which names the page and its line numbers).
    """
    import eqzoo

    # Setup blocks reach this module's helpers (tiny_hf_folder) as `docs_test`.
    namespace: dict = {"__name__": "__main__", "docs_test": sys.modules[__name__]}
    presets = {name: eqzoo.models.get_config(name) for name in eqzoo.models.list_presets()}
    modules = set(sys.modules)
    ran = skipped = 0
    try:
        for block in parse(path):
            label = f"{path.name}:{block.line}" + (" (setup)" if block.kind == "setup" else "")
            if block.skip is not None:
                print(f"docs-test: skipped {label}: {block.skip}", flush=True)
                skipped += 1
                continue
            # Padding keeps the page's line numbers in tracebacks.
            program = compile("\n" * (block.line - 1) + block.source(), str(path), "exec")
            start = time.perf_counter()
            try:
                exec(program, namespace)
            except Exception as e:
                if not (block.raises and any(c.__name__ == block.raises for c in type(e).__mro__)):
                    return f"FAILED at {label}:\n{traceback.format_exc()}"
            else:
                if block.raises:
                    return f"FAILED at {label}: it should raise {block.raises}, as its text says"
            ran += block.kind == "code"
            print(f"docs-test: {label} ran in {time.perf_counter() - start:.1f}s", flush=True)
    finally:
        # What a page changed stays on its page: presets a setup shrank, modules it wrote.
        for name, config in presets.items():
            eqzoo.models.register_preset(name, config, overwrite=True)
        for name in set(sys.modules) - modules:
            if not name.startswith(("eqzoo", "jax", "jaxlib")):
                module_file = getattr(sys.modules[name], "__file__", None) or ""
                if module_file.startswith(os.getcwd()):
                    del sys.modules[name]
    print(f"docs-test: {path.name}: {ran} blocks ran, {skipped} skipped", flush=True)
    return None


def main(argv: list[str]) -> int:
    """`python tests/docs/test_snippets.py [--json OUT] [PAGE.md ...]`: runs the pages (default:
    every guide with code) one after another in this process, each in a fresh namespace and a
    fresh directory under one new temporary directory (the folders and checkpoints the pages
    write never land in the checkout); with `--json`, writes `{page: failure or null}`."""
    import json
    import tempfile

    out = None
    if argv[:1] == ["--json"]:
        out, argv = argv[1], argv[2:]
    paths = [Path(a).resolve() for a in argv] or pages()
    # As tests/conftest.py: 8 CPU devices (scaling.md asks for them, the others run on them too),
    # set before JAX starts; eqzoo's annotations checked wherever the snippets call it. Standard
    # dtype promotion, as users have it.
    import jax
    from jaxtyping import install_import_hook

    jax.config.update("jax_num_cpu_devices", 8)
    install_import_hook(["eqzoo"], "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")
    base = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="eqzoo-docs-")
    print(f"docs-test: pages run under {scratch} (removed after, unless a page fails)", flush=True)
    sys.path.insert(0, "")  # a setup block may write a module for a snippet to import
    results = {}
    for path in paths:
        os.chdir(tempfile.mkdtemp(prefix=path.stem + "-", dir=scratch))
        start = time.perf_counter()
        results[path.name] = run_page(path)
        print(f"docs-test: {path.name} took {time.perf_counter() - start:.1f}s", flush=True)
        if results[path.name]:
            print(results[path.name], file=sys.stderr, flush=True)
        os.chdir(base)
        if out:
            Path(out).write_text(json.dumps(results))
    failed = any(results.values())
    if not failed:  # kept for a look at what a failing page wrote; removed otherwise
        shutil.rmtree(scratch, ignore_errors=True)
    return int(failed)


# Seconds each page took (the pages of one part run one after another in one process, so
# the first page of a part also pays for importing JAX and eqzoo), to split the pages into parts
# of about equal time; a page missing here counts as DEFAULT_COST. Only the balance depends on
# these: remeasure them (`python tests/docs/test_snippets.py` prints each page's time) when a page
# changes much. Measured on a shared 2-core machine; the earlier figures (sciml.md 62 s, hf.md 13 s,
# from before sciml.md was made cheaper and hf.md grew) put about 90 s more in one part than the other.
COSTS = {
    "bayes.md": 34.3,
    "checkpointing.md": 13.6,
    "diffusion.md": 21.8,
    "finetuning.md": 26.9,
    "getting-started.md": 20.6,
    "hf.md": 43.6,
    "index.md": 6.4,
    "migrating.md": 8.9,
    "moe.md": 16.3,
    "packing.md": 5.4,
    "quantization.md": 27.5,
    "scaling.md": 15.3,
    "sciml.md": 24.2,
    "vision.md": 26.8,
}
DEFAULT_COST = 10.0
PARTS = 2  # test_snippets.py runs part 0, test_snippets_2.py part 1


def part(index: int, parts: int = PARTS) -> list[Path]:
    """The pages of part `index` of `parts`: the costliest page first, each to the part with the
    least time so far (ties to the lower index), so every page lands in exactly one part."""
    loads = [0.0] * parts
    assigned: list[list[Path]] = [[] for _ in range(parts)]
    for page in sorted(pages(), key=lambda p: (-COSTS.get(p.name, DEFAULT_COST), p.name)):
        least = loads.index(min(loads))
        assigned[least].append(page)
        loads[least] += COSTS.get(page.name, DEFAULT_COST)
    return sorted(assigned[index])


def run_pages(paths: list[Path], directory: Path) -> tuple[dict, str]:
    """Runs `paths` in one fresh process (sharing its imports and compiled primitives), in
    `directory`. **Returns:** `({page name: failure or None}, the process's log)`."""
    import json

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    env["TMPDIR"] = str(directory)  # the pages' folders go under pytest's temporary directory
    # XLA_FLAGS as tests/conftest.py set them (its fast-compiling XLA:CPU settings): CI's time
    # goes to compiling these small programs.
    proc = subprocess.run(
        [sys.executable, __file__, "--json", "results.json", *map(str, paths)], cwd=directory, env=env,
        capture_output=True, text=True, timeout=900,
    )
    file = directory / "results.json"
    results = json.loads(file.read_text()) if file.exists() else {}
    return results, f"exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
