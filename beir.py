"""Evaluation data in BEIR layout (SPEC 6): corpus.jsonl, queries.jsonl and qrels/<split>.tsv of one folder, or a
folder of per-language folders (MIRACL/MLDR layout); every file checked as it is read, errors naming the file, the
line and the field. A file may be named in any case and compressed as the standard library reads (.gz: MIRACL ships
corpus.jsonl.gz; .bz2, .xz), UTF-8 with or without a byte-order mark. JSONL readers for training-format files too
(mine.py --jsonl).
"""
import bz2
import csv
import gzip
import json
import lzma
import os

from jsonl_index import BOM, NOT_UNICODE, is_unicode

READ = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # compressed files, read as they are
UNREAD = {".zst": "unzstd", ".lz4": "lz4 -d", ".zip": "unzip"}  # compressions the standard library does not read


def load_beir(data_dir, split, max_corpus=None, corpus=True, max_queries=None):
    """corpus records, queries with a relevant doc, qrels {qid: {doc_id: rel}}, counts of ids missing from the files;
    corpus False: only the queries and qrels checked and returned (corpus records and missing counts None).
    max_queries: the first N of those queries in the qrels file's order (quick runs, evaluation during training)."""
    _stop(*_check(data_dir, split))
    qpath, path = find(data_dir, "queries.jsonl"), find(data_dir, f"qrels/{split}.tsv")
    queries = {r["_id"]: r for r in read_jsonl(qpath, ("_id", "text"), "_id")}
    qrels = read_qrels(path)
    # queries without a relevant doc are skipped, as BEIR does; missing docs stay in qrels (they count as not found)
    usable = {q: rels for q, rels in qrels.items() if q in queries and max(rels.values()) > 0}
    if not usable:  # checked before the corpus is read and anything is encoded
        found = sum(q in queries for q in qrels)
        why = ("no rows" if not qrels else f"0 of {len(qrels)} query ids in qrels are in {qpath}" if not found else
               f"none of its {found} queries that are in {qpath} has a relevance > 0")
        raise ValueError(f"{path}: no query to evaluate: {why}")
    usable = dict(list(usable.items())[:max_queries])
    if not corpus:
        return None, [queries[q] for q in usable], usable, None
    cpath = find(data_dir, "corpus.jsonl")
    corpus = read_jsonl(cpath, ("_id", "text"), "_id")
    doc_ids = {r["_id"] for r in corpus}
    relevant = [d for rels in usable.values() for d, rel in rels.items() if rel > 0]
    if not any(d in doc_ids for d in relevant):  # every score would be 0
        raise ValueError(f"{path}: none of the {len(relevant)} relevant documents it names for its {len(usable)} "
                         f"queries is in {cpath} (e.g. {relevant[0]!r}): are these the qrels of another corpus?")
    missing = {"queries": sum(q not in queries for q in qrels),
               "docs": sum(d not in doc_ids for rels in qrels.values() for d in rels)}
    if max_corpus is not None:  # quick runs: every relevant doc (of the queries kept) plus the first max_corpus others
        rel = {d for rels in usable.values() for d in rels}
        corpus = [r for i, r in enumerate(corpus) if r["_id"] in rel or i < max_corpus]
    return corpus, [queries[q] for q in usable], usable, missing


def data_error(data_dir, split):
    """Why data_dir is not a BEIR dir with this split, naming the missing files, a compressed file we cannot read,
    several files for one, an empty corpus; None when it is."""
    return "; ".join(x for x in _check(data_dir, split) if x) or None


def _check(data_dir, split):
    """(the missing files, the other problems) of data_dir as a BEIR dir with this split: a message each, or None."""
    if not os.path.isdir(data_dir):
        return f"{data_dir}: no such directory", None
    files = ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv")
    gone, problems = [], []
    for name in files:
        try:
            path = find(data_dir, name)
            if path and name == "corpus.jsonl" and not any(raw.strip() for _, raw in _raw_lines(path)):  # (stops
                problems.append(f"{path}: no records (an empty corpus: nothing to retrieve)")  # at the first record)
        except ValueError as e:
            problems.append(str(e))
            continue
        if path is None:
            gone.append(name)
    qdir = files[2] in gone and _entry(data_dir, "qrels", os.path.isdir)  # (found: it did not raise in find)
    splits = f" (splits there: {sorted(os.listdir(qdir))})" if qdir else ""
    return (f"{data_dir}: no {', '.join(gone)}{splits}" if gone else None), "; ".join(problems) or None


def find(data_dir, name):
    """The path of `name` ("corpus.jsonl", "queries.jsonl" or "qrels/<split>.tsv") in data_dir: that name, else one
    that differs in case or is compressed as READ reads (corpus.jsonl.gz); None if there is none. ValueError: only
    a compression the standard library does not read (UNREAD), or several files for one name."""
    *sub, base = name.split("/")
    folder = _entry(data_dir, sub[0], os.path.isdir) if sub else data_dir
    return folder and _entry(folder, base, os.path.isfile, compressed=True)


def _entry(folder, name, kind, compressed=False):
    """folder/name if it is a `kind` (os.path.isfile or isdir), else the one entry of folder that is one and whose name
    is name in any case (compressed: with a suffix of READ or UNREAD); None if none."""
    if kind(os.path.join(folder, name)):
        return os.path.join(folder, name)
    hits = sorted(e for e in os.listdir(folder) if _named(e, name, compressed) and kind(os.path.join(folder, e)))
    if len(hits) > 1:
        raise ValueError(f"{folder}: {', '.join(hits)}: several files for {name}; keep one")
    ext = os.path.splitext(hits[0].lower())[1] if hits else None
    if ext in UNREAD:
        path = os.path.join(folder, hits[0])
        raise ValueError(f"{path}: compressed ({ext}), which the standard library does not read: decompress it "
                         f"({UNREAD[ext]} {path}) or gzip it")
    return os.path.join(folder, hits[0]) if hits else None


def _named(entry, name, compressed):
    e, name = entry.lower(), name.lower()
    return e == name or compressed and e.startswith(name) and e[len(name):] in {**READ, **UNREAD}


def lang_dirs(data_dir, split, langs=None):
    """{lang: folder} of a root of per-language BEIR folders (MIRACL/MLDR layout: data_dir/<lang>/corpus.jsonl,
    queries.jsonl, qrels/<split>.tsv), each checked by data_error: every sub-folder holding a BEIR file (corpus, queries
    or qrels, in any case or compression) is a language, so none drops out of the average unseen. None for a BEIR dir
    itself (its queries' lang field, if any, gives the languages) or a folder with neither. langs: the languages
    wanted, each must have its folder."""
    if not os.path.isdir(data_dir) or _beir_files(data_dir, ("corpus.jsonl",)):
        if langs:
            raise ValueError(f"{data_dir}: langs {','.join(langs)} name per-language folders, but this is not a folder "
                             "of them")
        return None
    found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))
                   and _beir_files(os.path.join(data_dir, d), ("corpus.jsonl", "queries.jsonl", "qrels")))
    for lang in langs or ():
        if lang not in found:
            raise FileNotFoundError(f"{os.path.join(data_dir, lang)}: no such language folder with BEIR files "
                                    f"(languages in {data_dir}: {', '.join(found) or 'none'})")
    dirs = {lang: os.path.join(data_dir, lang) for lang in langs or found}
    checks = [_check(d, split) for d in dirs.values()]
    _stop("; ".join(g for g, _ in checks if g), "; ".join(p for _, p in checks if p))
    return dirs or None


def _stop(gone, problems):
    """Raise _check's findings: FileNotFoundError when files are missing (the other problems too), else ValueError."""
    if gone or problems:
        raise (FileNotFoundError if gone else ValueError)("; ".join(x for x in (gone, problems) if x))


def _beir_files(folder, names):
    return [e for e in os.listdir(folder) if any(_named(e, n, True) for n in names)]


def _raw_lines(path):
    """(1-based line number, bytes) of every line of path, decompressed by its suffix (READ), a byte-order mark at
    its start dropped (as jsonl_index reads training files: `cat` of files that have one); a compressed file that is
    damaged stops naming it."""
    opener = READ.get(os.path.splitext(path)[1].lower(), open)
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                yield n, raw.removeprefix(BOM)
    except (EOFError, OSError, lzma.LZMAError) as e:
        if opener is open:
            raise
        raise ValueError(f"{path}: cannot be decompressed ({e}): is the file complete?") from None


def _text(path, n, raw):
    """Line n (bytes) of path as text; not UTF-8: an error naming the file and the line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}, line {n}: not valid UTF-8 (byte {e.start + 1} of the line): save the file as "
                         "UTF-8") from None


def read_jsonl(path, fields=(), unique=None, check=None):
    """JSON objects, one per non-empty line, each with a string value for every key in fields and, for the key unique,
    a value no other line has; check(record) -> an error or None (e.g. check_example for training records).
    Errors name the file and the 1-based line. path may be compressed (READ)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    recs, seen = [], {}  # seen: id -> line
    for n, raw in _raw_lines(path):
        if not raw.strip():
            continue
        try:
            r = json.loads(_text(path, n, raw))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(r, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(r).__name__}")
        for k in fields:
            if not isinstance(r.get(k), str):
                got = f"expected a string, got {json.dumps(r[k])[:40]}" if k in r else "missing"
                raise ValueError(f"{path}, line {n}: field '{k}': {got}")
        bad = next((k for k, v in r.items() if isinstance(v, str) and not is_unicode(v)), None)
        if bad:  # a "\ud800" escape: text without a UTF-8 form, which no tokenizer reads
            raise ValueError(f"{path}, line {n}: field '{bad}': {NOT_UNICODE}")
        error = check and check(r)
        if error:
            raise ValueError(f"{path}, line {n}: {error}")
        if unique:  # a repeated corpus id scores its relevant doc twice (nDCG@10 above 1)
            if r[unique] in seen:
                raise ValueError(f"{path}, line {n}: field '{unique}': duplicate id {r[unique]!r} "
                                 f"(first at line {seen[r[unique]]})")
            seen[r[unique]] = n
        recs.append(r)
    return recs


def read_qrels(path):
    """{query_id: {doc_id: rel}} from a BEIR qrels TSV (query-id, corpus-id, integer score); line 1 may be a header.
    path may be compressed (READ)."""
    qrels = {}
    rows = csv.reader((_text(path, n, raw) for n, raw in _raw_lines(path)), delimiter="\t")
    for row in rows:
        if not "".join(row).strip():
            continue  # blank line
        try:
            rel = int(row[-1]) if len(row) >= 3 and row[0] and row[1] else None
        except ValueError:
            rel = None
        if rel is not None:
            qrels.setdefault(row[0], {})[row[1]] = rel
        elif rows.line_num > 1:  # only line 1 may be a header
            raise ValueError(f"{path}, line {rows.line_num}: expected query-id<TAB>corpus-id<TAB>integer score, "
                             f"got {row}")
    return qrels


def passage_text(r):
    """title + " " + text when the title is non-empty (the convention of scifact/train_mined.jsonl)."""
    return f"{r['title']} {r['text']}" if r.get("title") else r["text"]
