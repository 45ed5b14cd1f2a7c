"""One list per choice: the config check, the command-line options and the README's choices table agree with the list
that lives next to the code, and a value outside it is refused naming every choice."""
import dataclasses
import importlib
import os
import re

import pytest

import eval as ev
import mine
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_choices():
    """{"module.NAME": (the option cell, the choices listed)} from the README's table of choices."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Options with a fixed set of choices")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")
            or line.startswith("| eval") or line.startswith("| a ") or line.startswith("| evaluation")]
    return {row[2].strip("`"): (row[0], re.findall(r"`([^`]+)`", row[1].split("(")[0])) for row in rows}


def code_list(name):
    module, attr = name.split(".")
    return [x for x in getattr(importlib.import_module(module), attr) if x != ""]


def test_the_readme_lists_every_choice_of_every_list():
    table = readme_choices()
    names = {f"model.{n}" for n in ("POOLINGS", "HEADS")} | {"losses.TEACHER_KD", "attention.MODES", "train.DTYPES",
                                                              "logs.REPORT_TO", "jsonl_index.TYPES", "eval.PROTOCOLS",
                                                              "search.PAPER", "search.FUSION", "search.ROWS",
                                                              "store.COLBERT_FROM"}
    assert set(table) == names
    for name, (_, listed) in table.items():
        assert listed == code_list(name), name


def test_config_accepts_every_choice_and_refuses_another_naming_them():
    lists = {"pooling": "model.POOLINGS", "teacher_kd_loss": "losses.TEACHER_KD", "attention": "attention.MODES",
             "dtype": "train.DTYPES", "report_to": "logs.REPORT_TO"}
    assert set(train.CHOICES) == set(lists)  # every Config key with a fixed set of choices
    for key, name in lists.items():
        for value in code_list(name):
            if not (key == "report_to" and value == "tensorboard"):  # (needs the package; tested in test_train)
                assert [k for k, _ in train.config_problems(train.Config(**{key: value}))] == [], (key, value)
        why = dict(train.config_problems(dataclasses.replace(train.Config(), **{key: "nope"})))[key]
        assert all(repr(v) in why for v in code_list(name)), why
    for head in code_list("model.HEADS"):  # head_schedule: every head by name, and only those
        assert train.parse_schedule(f"dense,{head}" if head != "dense" else "dense")
    with pytest.raises(ValueError, match="unknown head 'sparce': heads are dense, sparse, colbert"):
        train.parse_schedule("dense,sparce")


def test_command_line_choices_are_the_lists(capsys):
    def choices(p):
        return {a.dest: list(a.choices) for a in p._actions if a.choices is not None}
    got = choices(ev.parser())
    assert got == {"pooling": code_list("model.POOLINGS"), "protocol": code_list("eval.PROTOCOLS"),
                   "task": code_list("search.PAPER"), "colbert_from": code_list("store.COLBERT_FROM")}
    assert choices(ev.cli_parser("", "train")) == {"pooling": code_list("model.POOLINGS")}  # mine.py's options
    with pytest.raises(SystemExit):
        mine.main(["--ckpt", "x", "--jsonl", "x", "--out", "x", "--pooling", "max"])
    err = capsys.readouterr().err
    assert "--pooling: invalid choice: 'max'" in err and all(p in err for p in code_list("model.POOLINGS"))
    for name in code_list("search.FUSION"):  # --weights takes every fusion name, and numbers
        assert ev.option_error(name) is None
    assert ev.option_error("1,0.3,1") is None and "expected one of m3, mldr, miracl, mkqa" in ev.option_error("mdlr")
