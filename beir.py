"""Evaluation data in BEIR layout (SPEC 6): corpus.jsonl, queries.jsonl and qrels/<split>.tsv of one folder, or a
folder of per-language folders (MIRACL/MLDR layout); every file checked as it is read, errors naming the file, the
line and the field. JSONL readers for training-format files too (mine.py --jsonl).
"""
import csv
import json
import os

def load_beir(data_dir, split, max_corpus=None, corpus=True):
    """corpus records, queries with a relevant doc, qrels {qid: {doc_id: rel}}, counts of ids missing from the files;
    corpus False: only the queries and qrels checked and returned (corpus records and missing counts None)."""
    error = data_error(data_dir, split)
    if error:
        raise FileNotFoundError(error)
    qpath, path = os.path.join(data_dir, "queries.jsonl"), os.path.join(data_dir, "qrels", f"{split}.tsv")
    queries = {r["_id"]: r for r in read_jsonl(qpath, ("_id", "text"), "_id")}
    qrels = read_qrels(path)
    # queries without a relevant doc are skipped, as BEIR does; missing docs stay in qrels (they count as not found)
    usable = {q: rels for q, rels in qrels.items() if q in queries and max(rels.values()) > 0}
    if not usable:  # checked before the corpus is read and anything is encoded
        found = sum(q in queries for q in qrels)
        why = ("no rows" if not qrels else f"0 of {len(qrels)} query ids in qrels are in {qpath}" if not found else
               f"none of its {found} queries that are in {qpath} has a relevance > 0")
        raise ValueError(f"{path}: no query to evaluate: {why}")
    if not corpus:
        return None, [queries[q] for q in usable], usable, None
    corpus = read_jsonl(os.path.join(data_dir, "corpus.jsonl"), ("_id", "text"), "_id")
    doc_ids = {r["_id"] for r in corpus}
    missing = {"queries": sum(q not in queries for q in qrels),
               "docs": sum(d not in doc_ids for rels in qrels.values() for d in rels)}
    if max_corpus is not None:  # quick runs: every relevant doc plus the first max_corpus others
        rel = {d for rels in usable.values() for d in rels}
        corpus = [r for i, r in enumerate(corpus) if r["_id"] in rel or i < max_corpus]
    return corpus, [queries[q] for q in usable], usable, missing


def data_error(data_dir, split):
    """Why data_dir is not a BEIR dir with this split, naming the missing files; None when it is."""
    if not os.path.isdir(data_dir):
        return f"{data_dir}: no such directory"
    files = ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv")
    gone = [f for f in files if not os.path.isfile(os.path.join(data_dir, f))]
    qdir = os.path.join(data_dir, "qrels")
    splits = f" (splits there: {sorted(os.listdir(qdir))})" if files[2] in gone and os.path.isdir(qdir) else ""
    return f"{data_dir}: no {', '.join(gone)}{splits}" if gone else None


def lang_dirs(data_dir, split, langs=None):
    """{lang: folder} of a root of per-language BEIR folders (MIRACL/MLDR layout: data_dir/<lang>/corpus.jsonl,
    queries.jsonl, qrels/<split>.tsv), each checked by data_error; None for a BEIR dir itself (its queries' lang field,
    if any, gives the languages) or a folder with neither. langs: the languages wanted, each must have its folder."""
    if not os.path.isdir(data_dir) or os.path.isfile(os.path.join(data_dir, "corpus.jsonl")):
        if langs:
            raise ValueError(f"{data_dir}: langs {','.join(langs)} name per-language folders, but this is not a folder "
                             "of them")
        return None
    found = sorted(d for d in os.listdir(data_dir) if os.path.isfile(os.path.join(data_dir, d, "corpus.jsonl")))
    for lang in langs or ():
        if lang not in found:
            raise FileNotFoundError(f"{os.path.join(data_dir, lang)}: no such language folder with a corpus.jsonl "
                                    f"(languages in {data_dir}: {', '.join(found) or 'none'})")
    dirs = {lang: os.path.join(data_dir, lang) for lang in langs or found}
    errors = [e for e in (data_error(d, split) for d in dirs.values()) if e]
    if errors:
        raise FileNotFoundError("; ".join(errors))
    return dirs or None


def read_jsonl(path, fields=(), unique=None, check=None):
    """JSON objects, one per non-empty line, each with a string value for every key in fields and, for the key unique,
    a value no other line has; check(record) -> an error or None (e.g. check_example for training records).
    Errors name the file and the 1-based line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    recs, seen = [], {}  # seen: id -> line
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(r).__name__}")
            for k in fields:
                if not isinstance(r.get(k), str):
                    got = f"expected a string, got {json.dumps(r[k])[:40]}" if k in r else "missing"
                    raise ValueError(f"{path}, line {n}: field '{k}': {got}")
            if check and check(r):
                raise ValueError(f"{path}, line {n}: {check(r)}")
            if unique:  # a repeated corpus id scores its relevant doc twice (nDCG@10 above 1)
                if r[unique] in seen:
                    raise ValueError(f"{path}, line {n}: field '{unique}': duplicate id {r[unique]!r} "
                                     f"(first at line {seen[r[unique]]})")
                seen[r[unique]] = n
            recs.append(r)
    return recs


def read_qrels(path):
    """{query_id: {doc_id: rel}} from a BEIR qrels TSV (query-id, corpus-id, integer score); line 1 may be a header."""
    qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
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
