"""The docs travel with the repo and name things that exist, in README.md and every docs/*.md:

- every dotted symbol they cite (`stages.student.loss.cached_kl`, `pipeline.cli.main`,
  `storage_schemas.manifest.Manifest.check_same_origin`, ...) imports and resolves;
- every section of `docs/design.md` cites at least one;
- every repository path they name (backticked, or in prose under a known folder) exists, run-time
  outputs aside; paths are relative to the repository root wherever the page is;
- every relative markdown link resolves, relative to the page, to a file in the repository, and a
  `#fragment` to a heading (or `<a id>`) of the page it names;
- none points at a file outside the repository.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
_DOC_IDS = [p.relative_to(REPO).as_posix() for p in DOCS]

LAYERS = ("pipeline", "stages", "storage_schemas")
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_DOTTED = re.compile(rf"^(?:{'|'.join(LAYERS)})(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")


# --- symbols -------------------------------------------------------------------------------------
def cited_symbols(text: str) -> list[str]:
    """Backticked dotted names under the project's packages, in order of first mention."""
    found = []
    for span in _SPAN.findall(text):
        name = span.strip().removesuffix("()")
        if _DOTTED.match(name) and name not in found:
            found.append(name)
    return found


def _has_member(owner, name: str) -> bool:
    """getattr, or a declared field without a class-level value (dataclass / NamedTuple / annotated)."""
    if hasattr(owner, name):
        return True
    if isinstance(owner, type):
        if dataclasses.is_dataclass(owner) and name in {f.name for f in dataclasses.fields(owner)}:
            return True
        return any(name in getattr(klass, "__annotations__", {}) for klass in owner.__mro__)
    return False


def resolve(dotted: str) -> str | None:
    """None if `dotted` names an importable module or an attribute path under one, else what is wrong.

    Imports the longest importable module prefix, then walks the rest with getattr (classes'
    methods and declared fields too). A module that exists but fails to import is reported as such."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if missing == module_name or module_name.startswith(missing + ".") or not missing:
                continue  # this prefix is not a module: try a shorter one
            return f"{dotted}: importing {module_name} failed: {err}"
        except Exception as err:  # noqa: BLE001 - a module that exists but is broken
            return f"{dotted}: importing {module_name} failed: {type(err).__name__}: {err}"
        where = module_name
        for attr in parts[cut:]:
            if not _has_member(obj, attr):
                return f"{dotted}: {where} has no attribute {attr!r}"
            obj = getattr(obj, attr, None)
            where = f"{where}.{attr}"
            if obj is None:  # a declared field with no class-level value: nothing further to walk
                break
        return None
    return f"{dotted}: no importable module prefix"


def test_design_doc_cites_code():
    symbols = cited_symbols(DESIGN.read_text())
    assert len(symbols) >= 20, f"docs/design.md cites only {len(symbols)} symbols; expected its sections to cite code"


def current_text(doc: Path) -> str:
    """The page's text that names things as they are now: docs/migration.md's table keeps the old
    names in its first column on purpose, so that column is left out there (its new names are checked)."""
    text = doc.read_text()
    if doc.name != "migration.md":
        return text
    return "\n".join(line.split("|", 2)[2] if line.startswith("| ") else line for line in text.splitlines())


@pytest.mark.parametrize("doc", DOCS, ids=_DOC_IDS)
def test_cited_symbols_exist(doc: Path):
    problems = [p for s in cited_symbols(current_text(doc)) if (p := resolve(s))]
    assert not problems, f"{doc.relative_to(REPO)} cites symbols that do not exist:\n  " + "\n  ".join(problems)


def test_every_design_section_cites_code():
    sections = re.split(r"^## ", DESIGN.read_text(), flags=re.M)[1:]
    assert sections, "docs/design.md has no '## ' sections"
    bare = [s.splitlines()[0] for s in sections if not cited_symbols(s)]
    assert not bare, f"docs/design.md sections citing no function or class: {bare}"


def test_resolver_reports_missing_symbols():
    assert resolve("storage_schemas.manifest.Manifest.check_same_origin") is None
    assert resolve("stages.data.inputs.Example.loss_mask") is None  # a dataclass field without default
    assert "no attribute 'no_such_thing'" in resolve("stages.student.loss.no_such_thing")
    assert "no attribute" in resolve("storage_schemas.manifest.Manifest.no_such_method")
    assert resolve("stages.no_such_module.f") is not None


# --- paths ---------------------------------------------------------------------------------------
PATH_PREFIXES = tuple(f"{d}/" for d in (*LAYERS, "tests", "configs", "docs"))
RUNTIME_PREFIXES = ("runs/", "build/", ".venv/")        # outputs made at run time, not in a clone
_PLACEHOLDER = re.compile(r"[<>{}*]|\.\.\.|NNNNN|RRRRR")  # <UTC time>, {a,b}, globs, shard-NNNNN
_BARE_FILE = re.compile(r"^(?:Makefile|[A-Za-z0-9_.-]+\.(?:md|py|toml))$")
# Prose mentions outside backticks: a path under a known folder, or an upper-case doc like BENCHMARKS.md.
_PROSE_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(p.rstrip('/') for p in PATH_PREFIXES)})/[\w./-]*\w|[A-Z][A-Z_]+\.md)\b")


def _tokens(text: str) -> list[str]:
    """Path-like tokens of backticked spans (`key=value` -> value)."""
    out = []
    for chunk in _SPAN.findall(text):
        for token in chunk.split():
            token = token.split("=", 1)[1] if "=" in token else token
            out.append(token.strip("'\"(),;:"))
    return out


def named_paths(text: str) -> list[str]:
    """Repository paths a markdown file names in backticks or prose (not its links), each once, in order."""
    candidates = _tokens(text) + _PROSE_PATH.findall(text)
    paths = []
    for token in candidates:
        token = token.split("#", 1)[0].rstrip(".")
        if not token or "://" in token or token.startswith(("/", "~", "../")) or _PLACEHOLDER.search(token):
            continue
        if token.startswith(RUNTIME_PREFIXES):
            continue
        if token.startswith(PATH_PREFIXES):  # includes the folders themselves, `pipeline/`
            paths.append(token)
        elif "/" not in token and _BARE_FILE.match(token):
            paths.append(token)
    return list(dict.fromkeys(paths))


def _exists(path: str) -> bool:
    if "/" in path or (REPO / path).exists():
        return (REPO / path).exists()
    # A bare module file named after its folder (README "Layout": `stages/` ... `runner.py`):
    # it must exist somewhere in the project's packages.
    return path.endswith(".py") and any(next((REPO / d).rglob(path), None) for d in LAYERS)


@pytest.mark.parametrize("doc", DOCS, ids=_DOC_IDS)
def test_named_paths_exist(doc: Path):
    paths = named_paths(current_text(doc))
    assert paths, f"{doc.relative_to(REPO)}: found no repository paths; is the extraction broken?"
    missing = [p for p in paths if not _exists(p)]
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_path_extraction():
    text = ("See `stages/data/chat_masks.py` and [plot](docs/x.png), BENCHMARKS.md, (configs/a.yaml); "
            "`runs/demo/cache`, `shard-NNNNN.parquet`, `manifest.json`, `runs/bench/<UTC time>.json`, "
            "`make train CONFIG=my.yaml`, `--config configs/b.yaml`, `Makefile`, `s3://bucket/x`.")
    assert named_paths(text) == ["stages/data/chat_masks.py", "configs/b.yaml", "Makefile", "docs/x.png",
                                 "BENCHMARKS.md", "configs/a.yaml"]


# --- links ---------------------------------------------------------------------------------------
_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
_HTML_ID = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def link_targets(text: str) -> list[str]:
    """Targets of markdown links and images that point into the repository (no URL, no mail)."""
    return [t for t in _LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors of a markdown page (lower case, punctuation dropped, spaces to
    hyphens; code blocks skipped), and its explicit `<a id="...">` anchors."""
    found, fenced = set(_HTML_ID.findall(text)), False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := _HEADING.match(line)):
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-"))
    return found


def broken_links(doc: Path) -> list[str]:
    problems = []
    for target in link_targets(doc.read_text()):
        file_part, _, fragment = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.is_relative_to(REPO):
            problems.append(f"{target}: outside the repository")
        elif not path.exists():
            problems.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path.read_text()):
            problems.append(f"{target}: {path.relative_to(REPO)} has no heading #{fragment}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=_DOC_IDS)
def test_links_resolve(doc: Path):
    problems = broken_links(doc)
    assert not problems, f"{doc.relative_to(REPO)} has broken links:\n  " + "\n  ".join(problems)


def test_link_checking(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n## `make demo` and more\n```\n# not a heading\n```\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text("[ok](a.md) [ok](a.md#make-demo-and-more) [ok](#b) ![up](../docs/a.md) <a id=\"b\"></a> "
                    "[url](https://x.org/y.md) [gone](c.md) [bad](a.md#not-a-heading) [out](../../x.md)")
    assert broken_links(page) == ["c.md: no such file", "a.md#not-a-heading: docs/a.md has no heading #not-a-heading",
                                  "../../x.md: outside the repository"]


@pytest.mark.parametrize("doc", DOCS, ids=_DOC_IDS)
def test_docs_do_not_point_outside_the_repo(doc: Path):
    outside = sorted({t for t in _tokens(doc.read_text()) if t.startswith("../")})
    assert not outside, f"{doc.relative_to(REPO)} points at files a clone does not have: {outside}"
