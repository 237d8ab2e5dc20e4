"""The documentation runs as written, and the API reference lists every public name.

**Code blocks.** Every fenced ```` ```python ```` block of ``README.md`` and ``docs/*.md``
is executed, page by page in page order: each page has one namespace, so a block
continues the blocks above it on the same page (a name it uses comes from a block the
reader has just read, never from the test). A page runs in a fresh temporary directory,
so the files its blocks write (``grid.json``, ``runs/...``) land there. A block that
cannot run as a test (another library's code, a GPU install) is a ``bash``/``text`` block,
or a ``python`` block preceded by the HTML comment ``<!-- not run: REASON -->`` (invisible
on the rendered page), which this test reads and lists; the list is checked below so that
a new exception is a visible change.

**API reference.** ``docs/api*.md`` documents each name of ``dpmjax.__all__`` with a
mkdocstrings entry (``::: dpmjax.NAME``), so a new public name must be added there.
"""

import glob
import os
import re

import pytest

import dpmjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: pages whose blocks train or fit a model, or compile a dozen programs (15 s to minutes on
#: two busy cores): the full tier only. index.md's complete example stays in the quick tier.
SLOW_PAGES = {"README.md", "docs/getting-started.md", "docs/custom-loops.md", "docs/training.md",
              "docs/fitted-grids.md", "docs/solvers.md", "docs/learned-solvers.md"}

#: the ``python`` blocks marked ``<!-- not run: ... -->``, as (page, first code line)
NOT_RUN = {("docs/diffusers.md", "for t in scheduler.timesteps:")}

_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->\s*$")


def pages():
    """README.md, then docs/*.md in name order (paths relative to the repository)."""
    docs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return ["README.md"] + docs


def python_blocks(page):
    """``[(line, code, not_run_reason)]``: the page's ```python blocks in order (``line``:
    1-based line of the first code line; ``not_run_reason`` from the comment just above)."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if m.group(1) == "python":
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            reason = _NOT_RUN.match(lines[k].strip()) if k >= 0 else None
            blocks.append((i + 2, "\n".join(lines[i + 1:j]), reason.group(1) if reason else None))
        i = j + 1
    return blocks


def _page_params():
    out = []
    for page in pages():
        if any(reason is None for _, _, reason in python_blocks(page)):
            marks = [pytest.mark.slow] if page in SLOW_PAGES else []
            out.append(pytest.param(page, id=page, marks=marks))
    return out


@pytest.mark.parametrize("page", _page_params())
def test_python_blocks_run_in_page_order(page, tmp_path, monkeypatch):
    """Each page's blocks, executed in order in one namespace (in a temporary directory)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs:{page}"}
    ran = 0
    for line, code, reason in python_blocks(page):
        if reason is not None:
            continue
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the python block at {page}:{line} fails: {type(e).__name__}: {e}") from e
        ran += 1
    assert ran > 0


def test_the_blocks_not_run_are_the_listed_ones():
    """Every ```python block runs unless marked, and the marked ones are exactly NOT_RUN
    (each with its reason); a block marked by mistake, or a new exception, fails here."""
    marked = {(page, code.strip().split("\n")[0]): reason for page in pages()
              for _, code, reason in python_blocks(page) if reason is not None}
    assert set(marked) == NOT_RUN
    assert all(marked.values())
    assert sum(len(python_blocks(page)) for page in pages()) >= 20


def test_the_block_reader_finds_blocks_and_markers(tmp_path, monkeypatch):
    """The reader itself: fences, the marker just above a block, other languages skipped."""
    page = tmp_path / "p.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n<!-- not run: needs a GPU -->\n```python\nb = 2\n```\n"
                    "```bash\nls\n```\n```python\nc = a\n```\n")
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    assert python_blocks("p.md") == [(4, "a = 1", None), (9, "b = 2", "needs a GPU"), (15, "c = a", None)]


def _entries():
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "api*.md"))):
        with open(path) as f:
            names += re.findall(r"^::: dpmjax\.(\w+)\s*$", f.read(), flags=re.M)
    return names


def test_every_public_name_has_an_api_entry():
    entries = _entries()
    missing = sorted(set(dpmjax.__all__) - set(entries))
    assert not missing, f"add '::: dpmjax.NAME' entries to docs/api.md for {missing}"


def test_api_entries_are_public_and_unique():
    entries = _entries()
    assert entries, "docs/api*.md has no mkdocstrings entries"
    assert sorted(set(entries) - set(dpmjax.__all__)) == []
    assert len(entries) == len(set(entries))
