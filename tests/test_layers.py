"""The layers point one way: the data layer imports nothing of the model, training or evaluation; evaluation imports
nothing of training, and training nothing of evaluation except through selection.py (evaluation during training, its
one door); the shared modules import no other module of ours; no import circle, counting the imports inside
functions."""
import ast
import os
import sys

from tiny import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
SHARED = {"runtime", "logs"}  # what both sides need: rank-0 print, atomic writes, the process group; the logs
DATA = {"data", "jsonl_index", "beir"}
TRAINING = {"train", "checkpoints", "gradcache", "losses", "attention", "reference_names"}
EVALUATION = {"eval", "search", "store", "shards", "codec", "packed", "mine", "teacher"}
DOOR = "selection"  # evaluation during training and merging: evaluation's code, called by train.py and merge.py
ALLOWED = {  # module group -> the modules of ours it may pull in when imported (training: not counting DOOR's)
    **{m: SHARED for m in SHARED},
    **{m: SHARED | DATA for m in DATA},
    **{m: set(OURS) - TRAINING for m in EVALUATION | {DOOR}},
    **{m: set(OURS) - EVALUATION for m in TRAINING},
    "merge": set(OURS) - TRAINING | {"checkpoints"},  # checkpoints in, a merged one out (never over a run)
}


def pulled_in(module):
    """The modules of ours that `import module` loads, in a fresh interpreter."""
    code = f"import sys; import {module}; print(' '.join(m for m in sys.modules if m in {OURS!r}))"
    res = run([sys.executable, "-c", code], 120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    return set(res.stdout.split()) - {module}


def reach(module, door=None):
    """The modules of ours that module may load: its imports anywhere in its source (imports_of), and theirs; door's
    own imports not followed."""
    seen, todo = set(), [module]
    while todo:
        for n in imports_of(todo.pop()) - seen:
            seen.add(n)
            if n != door:
                todo.append(n)
    return seen - {module}


def test_every_module_pulls_in_only_its_own_layer_and_below():
    assert set(ALLOWED) <= set(OURS), set(ALLOWED) - set(OURS)
    for module, allowed in ALLOWED.items():
        extra = reach(module, DOOR if module in TRAINING else None) - allowed - {DOOR}
        assert not extra, f"{module} imports (directly or through others) {sorted(extra)}"
    assert pulled_in("data") == reach("data")  # what an interpreter loads is what the sources say


def imports_of(module):
    """The modules of ours that module's source imports anywhere (top level and inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(OURS) - {module}


def test_no_import_circle():
    graph = {m: imports_of(m) for m in OURS}
    state = {}  # module -> "open" while its imports are walked, "done" after

    def walk(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import circle: " + " -> ".join(path + [m, n])
            if n not in state:
                walk(n, path + [m])
        state[m] = "done"
    for m in OURS:
        if m not in state:
            walk(m, [])


def test_the_layer_checks_can_fail():
    assert "model" in reach("train") and "runtime" in imports_of("jsonl_index")  # the checks see real imports
    assert "eval" in reach("train") and "eval" not in reach("train", DOOR)  # only through the door
    assert imports_of("eval") & EVALUATION and not imports_of("eval") & TRAINING
