"""The documents hold together: every SPEC section a file cites exists in SPEC.md, the user-facing docs and module
docstrings name no path of one particular machine, and the user-facing docs do not point into this project's own
issue tracker (public FlagEmbedding issues, written "#982", are fine). Fast, no network: reads the repository's files.
"""
import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".sh")
SKIP_DIRS = {".git", ".venv", "runs", "out", ".cache", "__pycache__", ".pytest_cache", "node_modules"}

# "SPEC 3.4", "SPEC.md 6.2", "SPEC.md section 0", "SPEC.md sections 1-2", "SPEC 4.4-4.5", "SPEC 0, 3.3", "SPEC 3.4 and
# 3.5": the word SPEC (not inside a longer word), optionally ".md", optionally "section(s)", then numbers.
NUM = r"\d+(?:\.\d+)?"
SPEC_REF = re.compile(r"(?<![A-Za-z0-9_])SPEC(?:\.md)?(?:,?\s+sections?)?\s+(" + NUM + r")"
                      r"(?:\s*[-\u2013]\s*(" + NUM + r"))?"  # a range: both ends must exist
                      r"((?:\s*(?:,|/|\band\b)\s*" + NUM + r"(?=[)\];,.:']|\s*$|\s+and\b))*)")  # more sections
# SPEC glued to a number (SPEC then 7 without a space; also after ".md"): a reference with its space missing, reported
# as unresolved.
SPEC_GLUED = re.compile(r"(?<![A-Za-z0-9_])SPEC(?:\.md)?(\d[\d.]*)")
# SPEC.md's references to its own sections: "§4.6", "(§2)", "section 4.5", "sections 1-7".
SELF_REF = re.compile(r"§\s*(" + NUM + r")|\bsections?\s+(" + NUM + r")(?:\s*[-\u2013]\s*(" + NUM + r"))?")

# a path on one particular machine; /data/..., /usr/bin/time and URLs (".../home/...") are not
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|home|tmp|opt|Users)/")

# this project's own issue tracker: "issue 16", "issues 15 and 16", "issue 16's author", "the issue's targets",
# "the author of issue 16". Public FlagEmbedding issues carry a '#': "#982", "issue #982", "FlagEmbedding #982".
TRACKER = re.compile(r"\bissues?\s+(?!#)\d+|\bissue's\b|\bauthors?\s+of\s+(?:the\s+|this\s+)?issue\b", re.IGNORECASE)


def repo_files():
    """Text files of the repository: tracked ones and new ones git does not ignore (a file about to be committed counts
    too); without git, every file under ROOT outside the usual build and environment folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        out = []
        for d, dirs, fs in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            out += [os.path.relpath(os.path.join(d, f), ROOT) for f in fs]
    return sorted({f for f in out if f.endswith(TEXT_SUFFIXES) and os.path.isfile(os.path.join(ROOT, f))})


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def spec_sections(text):
    """{"0", "1", ..., "1.1", "3.4", ...}: the sections SPEC.md has ("## n." and "### n.m" headings)."""
    top = re.findall(r"^##\s+(\d+)\.", text, re.M)
    sub = re.findall(r"^###\s+(\d+\.\d+)\b", text, re.M)
    return set(top) | set(sub)


def spec_refs(line):
    """The section numbers a line cites as SPEC references, and the glued spellings (no space before the number)."""
    refs = []
    for m in SPEC_REF.finditer(line):
        refs += [m.group(1)] + ([m.group(2)] if m.group(2) else []) + re.findall(NUM, m.group(3) or "")
    return refs, [m.group(0) for m in SPEC_GLUED.finditer(line)]


def unresolved(refs, sections):
    return [r for r in refs if r not in sections]


def docstring_lines(rel):
    """(line number, line) of the module docstring of a Python file, as written in the source."""
    src = read(rel)
    try:
        body = ast.parse(src).body
    except SyntaxError:
        return []
    if not body or not isinstance(body[0], ast.Expr) or not isinstance(getattr(body[0], "value", None), ast.Constant) \
            or not isinstance(body[0].value.value, str):
        return []
    lines = src.splitlines()
    return [(n, lines[n - 1]) for n in range(body[0].lineno, body[0].end_lineno + 1)]


def doc_lines(rel):
    """(line number, line) of a whole document, or of a Python file's module docstring."""
    if rel.endswith(".py"):
        return docstring_lines(rel)
    return list(enumerate(read(rel).splitlines(), 1))


def user_docs(files):
    """The documents users read: every Markdown file, the configs, the shell scripts."""
    return [f for f in files if f.endswith((".md", ".sh")) or (f.startswith("configs/") and f.endswith(".yaml"))]


# ----------------------------------------------------------------------------------------------------------------
# the matchers themselves: each check below fails when its matcher misses what it is meant to catch

def test_matchers_catch_what_they_are_meant_to():
    spec = "SP" + "EC"  # written in two pieces so that this file's own scan does not read these examples as citations
    sections = {"0", "1", "1.1", "3", "3.4", "3.5", "4", "4.4", "4.5", "6", "6.2"}
    cases = {f"({spec} 3.4)": [], f"({spec}.md 6.2).": [], f"{spec}.md section 0 lists": [], f"({spec} 4)": [],
             f"{spec}.md sections 1-2.": ["2"], f"({spec} 4.4-4.6;": ["4.6"], f"({spec} 0, 3.3)": ["3.3"],
             f"{spec} 3.4 and 3.9)": ["3.9"], f"{spec} 9.1's table": ["9.1"], f"({spec} 7).": ["7"],
             f"{spec} 4.5, 12 files": []}
    for line, missing in cases.items():
        assert unresolved(spec_refs(line)[0], sections) == missing, line
    assert spec_refs(f"see {spec}7 and {spec}.md2")[1] == [f"{spec}7", f"{spec}.md2"]
    assert spec_refs(f"INSPEC7 x_{spec}2 {spec}S")[1] == []  # inside longer words: not a citation
    assert spec_sections("## 0. Where\n## 3. Loss\n### 3.4 Unified\n## The recipe\n") == {"0", "3", "3.4"}
    bad = ["/" + "work/refvenv/bin/python", "(/" + "home/me/x)", "`/" + "tmp/run`", "/" + "Users/me",
           "/" + "root/.cache", "/" + "opt/conda/bin"]
    assert all(MACHINE_PATH.search(x) for x in bad)
    assert not any(MACHINE_PATH.search(x) for x in ["/data/pairs/", "/usr/bin/time", "https://x.org/home/y",
                                                    "runs/tmp/x", "~/work/x"])
    tracker = ["issue " + "16's author", "the " + "issue's targets", "Issue " + "15", "the author of " + "issue 16",
               "issues " + "15 and 16"]
    assert all(TRACKER.search(x) for x in tracker)
    assert not any(TRACKER.search(x) for x in ["FlagEmbedding #982", "(issue #694)", "issues #497, #1074",
                                               "FlagEmbedding issue #982", "an issue with padding"])


# ----------------------------------------------------------------------------------------------------------------
# (a) every SPEC reference names a section of SPEC.md

def test_every_spec_reference_names_a_section_of_spec_md():
    assert os.path.isfile(os.path.join(ROOT, "SPEC.md")), "SPEC.md is missing from the repository root"
    spec_text = read("SPEC.md")
    sections = spec_sections(spec_text)
    assert {"0", "1", "3", "3.4", "6.2"} <= sections, f"SPEC.md's headings look wrong: {sorted(sections)}"
    bad, n_refs = [], 0
    for rel in repo_files():
        for n, line in enumerate(read(rel).splitlines(), 1):
            refs, glued = spec_refs(line)
            n_refs += len(refs)
            for r in unresolved(refs, sections):
                bad.append(f"{rel}:{n}: SPEC {r} (no heading '## {r}.' / '### {r}'): {line.strip()[:120]}")
            bad += [f"{rel}:{n}: '{g}' (a space missing?): {line.strip()[:120]}" for g in glued]
    for n, line in enumerate(spec_text.splitlines(), 1):  # SPEC.md's own "§4.6" / "section 4.5"
        if line.startswith("#"):
            continue
        for m in SELF_REF.finditer(line):
            for r in filter(None, m.groups()):
                if r not in sections:
                    bad.append(f"SPEC.md:{n}: section {r} of itself does not exist: {line.strip()[:120]}")
    assert n_refs > 50, f"only {n_refs} SPEC references found: is the scan reading the repository?"
    assert not bad, "unresolved SPEC references:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------------------------
# (b) no path of one particular machine in the docs and module docstrings

def test_docs_and_module_docstrings_name_no_machine_path():
    files = repo_files()
    checked = user_docs(files) + [f for f in files if f.endswith(".py")]
    assert "README.md" in checked and "RESULTS.md" in checked
    bad = [f"{rel}:{n}: {line.strip()[:140]}" for rel in checked for n, line in doc_lines(rel)
           if MACHINE_PATH.search(line)]
    assert not bad, ("paths of one machine (/work/, /root/, /home/, /tmp/, /opt/, /Users/) in docs or module "
                     "docstrings; use a placeholder users can fill in:\n" + "\n".join(bad))


# ----------------------------------------------------------------------------------------------------------------
# (c) the user-facing docs speak to users, not to this project's issue tracker

def test_user_docs_do_not_cite_this_projects_issue_tracker():
    files = repo_files()
    checked = user_docs(files) + [f for f in files if f.endswith(".py")]
    for doc in ("README.md", "RESULTS.md", "data/README.md"):
        assert doc in checked, f"{doc} is missing"
    bad = [f"{rel}:{n}: {line.strip()[:140]}" for rel in checked for n, line in doc_lines(rel)
           if TRACKER.search(line)]
    assert not bad, ("references to this project's issue tracker in user-facing docs (say what was measured or "
                     "targeted instead; FlagEmbedding issues are written '#N'):\n" + "\n".join(bad))


@pytest.mark.parametrize("doc", ["README.md", "RESULTS.md", "data/README.md", "SPEC.md"])
def test_user_docs_exist_and_are_utf8(doc):
    assert read(doc).strip(), f"{doc} is empty"


# ----------------------------------------------------------------------------------------------------------------
# (d) the README's common edits point at code and tests that exist

def test_common_edits_name_functions_and_tests_that_exist():
    section = read("README.md").split("## Common edits")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| edit")]
    assert len(rows) >= 8, rows
    pairs = re.findall(r"`(\w+\.py)` `([\w.]+)`", section)  # a file, then the function or list to edit there
    tests = re.findall(r"`(tests/\w+\.py)::(\w+)`", section)
    assert len(pairs) >= 4 and len(tests) >= len(rows)
    for fname, name in pairs:
        src = read(fname)
        last = name.split(".")[-1]
        assert re.search(rf"^\s*(def|class) {last}\b|^{last}\s*=", src, re.M), f"README: {fname} has no {name}"
    for fname, name in tests:
        assert f"def {name}(" in read(fname), f"README: {fname} has no test {name}"
