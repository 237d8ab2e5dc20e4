"""The API reference of the docs site lists every public name, and only public names.

``docs/api*.md`` documents each name of ``dpmjax.__all__`` with a mkdocstrings entry
(``::: dpmjax.NAME``), so a new public name must be added there.
"""

import glob
import os
import re

import dpmjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
