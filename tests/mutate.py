"""Mutation testing: plant one small bug at a time in a module and see whether the tests
catch it.

    python tests/mutate.py sae_jax/losses.py [training.loop ...] [--jobs=2]

Each mutant changes one expression or statement of a module (an arithmetic or
comparison operator swapped, ``and``/``or`` swapped, a ``not`` or unary minus dropped,
a number made one larger, ``True``/``False`` swapped, a statement that is a call
replaced by ``pass``). Docstrings, other strings, annotations and lines marked
``# pragma: no mutate`` are left alone.

One run first executes the test files once with every line of the target modules
traced (in the test processes and in the scripts they start) to learn which tests run
which line. Each mutant is then written into a private copy of the repository and
only the tests that run its line are run, fastest first, stopping at the first
failure. A mutant is *killed* when a test fails (or the tests time out), and
*survives* when they all pass or when no test runs its line. The report lists every
survivor; ``--json`` keeps all results.

Without ``--tests`` the test files come from ``TESTS`` below (a module's own tests).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The fast tests of each module: those that exercise it directly.
TESTS = {
    "losses": ["test_losses.py", "test_models.py", "training/test_loop.py"],
    "corruption": ["test_corruption.py", "test_models.py", "training/test_loop.py"],
    "training/loop": ["training/test_loop.py", "training/test_pipeline.py", "test_parallel.py"],
    "training/objectives": [
        "training/test_stage.py",
        "training/test_pipeline.py",
        "test_models.py",
    ],
    "training/evaluate": [
        "training/test_stage.py",
        "training/test_pipeline.py",
        "test_parallel.py",
    ],
    "training/layerwise": [
        "training/test_stage.py",
        "training/test_pipeline.py",
        "test_models.py",
        "workdir/test_checkpoint.py",
    ],
    "training/pipeline": [
        "training/test_pipeline.py",
        "training/test_stage.py",
        "test_parallel.py",
        "workdir/test_checkpoint.py",
    ],
    "workdir/checkpoint": [
        "workdir/test_checkpoint.py",
        "commands/test_faults.py",
        "test_models.py",
    ],
    "config/files": ["config/test_config_files.py"],
    "config/schema": ["config/test_schema.py"],
    "training/optim": ["training/test_optim.py", "training/test_loop.py"],
    "training/stage": [
        "training/test_stage.py",
        "workdir/test_checkpoint.py",
        "training/test_search.py",
        "training/test_loop.py",
    ],
    "training/hparams": ["training/test_hparams.py", "test_parallel.py", "commands/test_cli.py"],
    "training/sweep": ["training/test_search.py", "test_parallel.py"],
    "training/search": ["training/test_search.py", "test_parallel.py"],
    "training/epochs": [
        "training/test_loop.py",
        "training/test_stage.py",
        "training/test_search.py",
    ],
    "workdir/restore": ["workdir/test_checkpoint.py", "commands/test_faults.py"],
    "workdir/saving": [
        "workdir/test_saving.py",
        "workdir/test_checkpoint.py",
        "commands/test_faults.py",
    ],
    "workdir/metrics": ["workdir/test_metrics.py", "workdir/test_checkpoint.py"],
    "workdir/figures": ["workdir/test_checkpoint.py", "workdir/test_tensorboard.py"],
    "workdir/summary": ["workdir/test_checkpoint.py", "commands/test_cli.py"],
    "workdir/tensorboard": ["workdir/test_tensorboard.py"],
    "commands/exits": [
        "commands/test_exits.py",
        "commands/test_faults.py",
        "commands/test_cli.py",
        "commands/test_entry.py",
    ],
    "commands/flags": [
        "commands/test_cli.py",
        "commands/test_entry.py",
        "config/test_config_files.py",
    ],
    "commands/prepare": [
        "commands/test_cli.py",
        "commands/test_ownership.py",
        "commands/test_own_data.py",
    ],
    "commands/progress": ["workdir/test_checkpoint.py", "commands/test_cli.py"],
    "commands/train": [
        "commands/test_cli.py",
        "commands/test_faults.py",
        "commands/test_ownership.py",
    ],
    "commands/saved": [
        "commands/test_own_data.py",
        "commands/test_ownership.py",
        "commands/test_faults.py",
    ],
    "commands/sweep": ["commands/test_cli.py", "commands/test_sweep_equals_runs.py"],
    "commands/search": ["training/test_search.py", "commands/test_cli.py"],
    "cli/main": ["commands/test_entry.py"],
}
COPIED = ["sae_jax", "tests", "experiments", "docs", "README.md", "pyproject.toml"]


def _own_tests(module: str) -> str:
    """The test file beside a module's folder: ``training/loop`` -> ``training/test_loop.py``."""
    folder, _, name = module.rpartition("/")
    return f"{folder}/test_{name}.py" if folder else f"test_{name}.py"


def module_name(spec: str | Path) -> str:
    """A module of sae_jax as its path below ``sae_jax/`` without ``.py``
    (``training/loop``), from that, a dotted name or a path to the file."""
    text = str(spec).replace("\\", "/")
    if text.endswith(".py"):
        text = text[: -len(".py")]
        if "sae_jax/" in text:
            text = text.rpartition("sae_jax/")[2]
    return text.replace(".", "/").removeprefix("sae_jax/")


_SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


@dataclass
class Mutant:
    """One planted bug: the source segment from ``start`` to ``end`` (line, column)
    replaced by ``text``."""

    module: str
    line: int
    start: tuple[int, int]
    end: tuple[int, int]
    before: str
    text: str
    outcome: str = ""
    seconds: float = 0.0

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line.encode()))
        data = source.encode()
        a = offsets[self.start[0] - 1] + self.start[1]
        b = offsets[self.end[0] - 1] + self.end[1]
        return (data[:a] + self.text.encode() + data[b:]).decode()


# --------------------------------------------------------------------------- mutants


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, f-strings, ``__all__``."""
    skip = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            skip.append(first)  # a docstring (or a bare constant, which does nothing)
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            skip.append(node.annotation)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            skip.append(node.returns)
        if isinstance(node, ast.JoinedStr):
            skip.append(node)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            skip.append(node)
    return {id(sub) for node in skip for sub in ast.walk(node)}


def _variants(node: ast.AST) -> list[ast.AST]:
    """The mutated copies of one node (an empty list for most nodes)."""

    def changed(**fields):
        new = type(node)(**{f: getattr(node, f) for f in node._fields})
        for name, value in fields.items():
            setattr(new, name, value)
        return new

    if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _SWAP:
        return [changed(op=_SWAP[type(node.op)]())]
    if isinstance(node, ast.BoolOp):
        return [changed(op=_SWAP[type(node.op)]())]
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _SWAP:
        return [changed(ops=[_SWAP[type(node.ops[0])]()])]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        return [node.operand]
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        value = (not node.value) if isinstance(node.value, bool) else node.value + 1
        return [ast.Constant(value)]
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return [ast.Pass()]
    return []


def mutants(path: Path) -> list[Mutant]:
    """Every mutant of the module at ``path``, in source order."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "end_lineno"):
            continue
        if "pragma: no mutate" in lines[node.lineno - 1]:
            continue
        for variant in _variants(node):
            text = ast.unparse(variant)
            if not isinstance(node, ast.stmt):
                text = f"({text})"
            found.append(
                Mutant(
                    module=module_name(path),
                    line=node.lineno,
                    start=(node.lineno, node.col_offset),  # columns are UTF-8 byte offsets
                    end=(node.end_lineno, node.end_col_offset),
                    before=ast.get_source_segment(source, node).split("\n")[0],
                    text=text,
                )
            )
    return sorted(found, key=lambda m: (m.start, m.end))


# --------------------------------------------------------------------------- tracing
# The tracer runs inside the test processes: loaded with ``-p mutate`` by pytest, and by
# a ``sitecustomize`` in every Python process those tests start.

_HITS: set[tuple[str, int]] = set()


def _start_tracing(targets: set[str]) -> None:
    import threading

    def local(frame, event, arg):
        if event == "line":
            _HITS.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def on_call(frame, event, arg):
        if frame.f_code.co_filename in targets:
            _HITS.add((frame.f_code.co_filename, frame.f_lineno))
            return local
        return None

    sys.settrace(on_call)
    threading.settrace(on_call)


def _take_hits() -> dict[str, list[int]]:
    hits: dict[str, list[int]] = {}
    for name, line in sorted(_HITS):
        hits.setdefault(name, []).append(line)
    _HITS.clear()
    return hits


def trace_subprocess() -> None:
    """Called from ``sitecustomize``: trace this process, write its lines at exit."""
    import atexit

    out = os.environ.get("SAE_JAX_MUTATE_HITS")
    if not out:
        return
    _start_tracing(set(json.loads(os.environ["SAE_JAX_MUTATE_TARGETS"])))

    def dump():
        with open(f"{out}.{os.getpid()}", "w") as f:
            json.dump(_take_hits(), f)

    atexit.register(dump)


def pytest_configure(config) -> None:
    _start_tracing(set(json.loads(os.environ["SAE_JAX_MUTATE_TARGETS"])))


def _write_record(name: str, record: dict) -> None:
    out = Path(os.environ["SAE_JAX_MUTATE_OUT"])
    with open(out / f"{os.getpid()}-{name}.json", "w") as f:
        json.dump(record, f)


def pytest_collection_finish(session) -> None:
    # Lines run at import (definitions, defaults, constants) matter to every test.
    _write_record("import", {"test": "*", "seconds": 0.0, "lines": _take_hits()})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item.mutate_failed = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _take_hits()
    out = Path(os.environ["SAE_JAX_MUTATE_OUT"]) / f"{os.getpid()}-{abs(hash(item.nodeid))}"
    os.environ["SAE_JAX_MUTATE_HITS"] = str(out)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    lines = _take_hits()
    for part in out.parent.glob(out.name + ".*"):
        for name, more in json.loads(part.read_text()).items():
            lines[name] = sorted(set(lines.get(name, [])) | set(more))
        part.unlink()
    record = {"test": item.nodeid, "seconds": seconds, "lines": lines}
    _write_record(out.name.split("-")[1], {**record, "failed": hasattr(item, "mutate_failed")})


# --------------------------------------------------------------------------- running


def _copy_repo(root: Path) -> Path:
    """A private copy of the repository at ``root/repo``, with ``../shared`` beside it."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(
                src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "_build")
            )
        else:
            shutil.copy2(src, repo / name)
    if (REPO.parent / "shared").exists():
        (root / "shared").symlink_to(REPO.parent / "shared")
    return repo


def _env(repo: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])])
    return env


def map_lines(repo: Path, modules: list[str], tests: list[str], jobs: int) -> dict:
    """Run ``tests`` once with the modules' lines traced.

    Returns ``{module: {str(line): {test: seconds}}}``; lines run at import map to every
    test that runs any line of the module.
    """
    out = repo.parent / "hits"
    out.mkdir()
    site = repo.parent / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(repo / 'tests')!r})\n"
        "import mutate\nmutate.trace_subprocess()\n"
    )
    targets = {m: str(repo / "sae_jax" / f"{m}.py") for m in modules}
    env = _env(repo, SAE_JAX_MUTATE_TARGETS=json.dumps(sorted(targets.values())))
    env["SAE_JAX_MUTATE_OUT"] = str(out)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(repo / "tests"), env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "mutate", "-p", "no:cacheprovider"]
    cmd += ["-n", str(jobs), "--dist", "loadfile"] if jobs > 1 else ["-p", "no:xdist"]
    proc = subprocess.run([*cmd, *tests], cwd=repo, env=env, capture_output=True, text=True)
    records = [json.loads(path.read_text()) for path in out.glob("*.json")]
    failed = sorted(r["test"] for r in records if r.get("failed"))
    if proc.returncode != 0 and not failed:
        sys.exit(f"the tests cannot run:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    for test in failed:  # such a test would "kill" every mutant: it is left out
        print(f"left out: {test} fails with its lines traced, before any mutation")
    by_module: dict = {m: {} for m in modules}
    imported: dict = {m: set() for m in modules}
    for record in records:
        if record.get("failed"):
            continue
        for m, file in targets.items():
            for line in record["lines"].get(file, []):
                if record["test"] == "*":
                    imported[m].add(line)
                else:
                    by_module[m].setdefault(str(line), {})[record["test"]] = record["seconds"]
    for m in modules:
        users = {t: s for tests_of_line in by_module[m].values() for t, s in tests_of_line.items()}
        for line in map(str, imported[m]):
            by_module[m][line] = {**users, **by_module[m].get(line, {})}
    return by_module


def run_mutant(mutant: Mutant, repo: Path, tests: dict[str, float], skip: list[str]) -> None:
    """Plant ``mutant`` in ``repo``, run ``tests`` (fastest first, not those in ``skip``)
    and set its outcome."""
    if not tests:
        mutant.outcome = "survived (no fast test runs this line)"
        return
    path = repo / "sae_jax" / f"{mutant.module}.py"
    original = path.read_text()
    path.write_text(mutant.apply(original))
    order = sorted(tests, key=tests.get)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:xdist", *order, *(f"--deselect={t}" for t in skip)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=repo, env=_env(repo), capture_output=True, text=True,
            timeout=120 + 3 * sum(tests.values()),
        )  # fmt: skip
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    finally:
        path.write_text(original)
    mutant.seconds = time.perf_counter() - start
    if code == 0:
        mutant.outcome = "survived"
    elif code in (1, 2, 3, 4, "timeout"):  # 3, 4: pytest could not even start the tests
        mutant.outcome = "killed" if code != "timeout" else "killed (timeout)"
    else:
        mutant.outcome = f"error (pytest exit {code}): {proc.stdout[-500:]}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report(found: list[Mutant]) -> str:
    """Per module: mutants, killed, survived, then every survivor."""
    rows = [
        "| module | mutants | killed | survived | killed % |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for module in dict.fromkeys(m.module for m in found):
        ours = [m for m in found if m.module == module]
        killed = sum(m.outcome.startswith("killed") for m in ours)
        rows.append(
            f"| {module} | {len(ours)} | {killed} | {len(ours) - killed} "
            f"| {100 * killed / len(ours):.1f} |"
        )
    survivors = [m for m in found if not m.outcome.startswith("killed")]
    rows += ["", f"{len(survivors)} survivor(s):"]
    rows += [
        f"  {m.module}.py:{m.line}: {m.before!r} -> {m.text!r}  [{m.outcome}]" for m in survivors
    ]
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", help="modules of sae_jax: names or paths")
    parser.add_argument("--tests", nargs="+", help="test files (default: TESTS of each module)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--lines", help="only mutants on lines A-B, e.g. 120-180")
    parser.add_argument(
        "--sample",
        type=int,
        help="only this many mutants of each module, drawn at random (--seed): an "
        "estimate of its kill rate for less time (default: every mutant)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the draw of --sample (default 0)")
    parser.add_argument("--json", type=Path, help="write every mutant and its outcome here")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="leave out the tests slower than this when traced (default 30)",
    )
    parser.add_argument(
        "--map", type=Path, help="keep the map of lines to tests here and reuse it when present"
    )
    parser.add_argument(
        "--retry",
        type=Path,
        help="only the survivors of this --json report, each against all the test files",
    )
    return parser


def _chosen(found: list[Mutant], lines: str | None, retry: Path | None) -> list[Mutant]:
    """The mutants on ``lines`` ("A-B") that did not die in the ``retry`` report."""
    if lines:
        low, high = (int(x) for x in lines.split("-"))
        found = [m for m in found if low <= m.line <= high]
    if retry:
        before = json.loads(retry.read_text())
        again = {(m["module"], m["line"], m["before"], m["text"]) for m in before}
        again -= {(m["module"], m["line"], m["before"], m["text"]) for m in before
                  if m["outcome"].startswith("killed")}  # fmt: skip
        found = [m for m in found if (m.module, m.line, m.before, m.text) in again]
    return found


def sampled(found: list[Mutant], n: int, seed: int) -> list[Mutant]:
    """At most ``n`` of each module's mutants, drawn at random by ``seed``, in their order."""
    import random

    draw = random.Random(seed)
    chosen: set[int] = set()
    for module in dict.fromkeys(m.module for m in found):
        ours = [i for i, m in enumerate(found) if m.module == module]
        chosen.update(draw.sample(ours, min(n, len(ours))))
    return [m for i, m in enumerate(found) if i in chosen]


def _line_map(args: argparse.Namespace, modules: list[str], tests: list[str], repo: Path) -> dict:
    """The kept ``--map`` when it fits the sources, else a new one (none for a retry)."""
    sources = {m: _digest(REPO / "sae_jax" / f"{m}.py") for m in modules}
    if args.map and args.map.exists():
        kept = json.loads(args.map.read_text())
        stale = sorted(m for m in modules if kept["sources"].get(m) != sources[m])
        if stale:
            sys.exit(f"{args.map}: made for another version of {', '.join(stale)}")
        return kept["lines"]
    if args.retry:
        return {m: {} for m in modules}
    lines = map_lines(repo, modules, tests, args.jobs)
    if args.map:
        args.map.write_text(json.dumps({"sources": sources, "lines": lines}))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    modules = [module_name(m) for m in args.modules]
    for m in modules:
        if not (REPO / "sae_jax" / f"{m}.py").is_file():
            parser.error(f"no module sae_jax/{m}.py")
    files = args.tests or sorted(
        {
            t
            for m in modules
            for t in TESTS.get(m, [f"{m.rpartition('/')[0]}/test_{Path(m).name}.py".lstrip("/")])
        }
    )
    tests = [t if t.startswith("tests/") else f"tests/{t}" for t in files]
    found = [mut for m in modules for mut in mutants(REPO / "sae_jax" / f"{m}.py")]
    found = _chosen(found, args.lines, args.retry)
    if args.sample is not None:
        found = sampled(found, args.sample, args.seed)
    with tempfile.TemporaryDirectory(prefix="sae_jax_mutate_") as tmp:
        copies = [_copy_repo(Path(tmp) / f"w{i}") for i in range(args.jobs)]
        start = time.perf_counter()
        lines = _line_map(args, modules, tests, copies[0])
        print(f"{len(found)} mutants; tests mapped to lines in {time.perf_counter() - start:.0f} s")
        known = {t: sec for m in lines.values() for run in m.values() for t, sec in run.items()}
        slow = sorted(t for t, sec in known.items() if sec > args.max_seconds)
        print(f"left out as slow (over {args.max_seconds:g} s traced): {len(slow)} tests")
        # A retry runs whole files, new tests included; the time limit counts the
        # files' fast tests as traced.
        every = {
            t: sum(sec for n, sec in known.items() if n.startswith(t) and sec <= args.max_seconds)
            for t in tests
        }
        free = list(copies)

        def work(mutant: Mutant) -> Mutant:
            repo = free.pop()
            try:
                if args.retry:  # whole files, less the slow tests
                    run_mutant(mutant, repo, every, slow)
                else:
                    run = lines[mutant.module].get(str(mutant.line), {})
                    fast = {t: sec for t, sec in run.items() if sec <= args.max_seconds}
                    run_mutant(mutant, repo, fast, [])
            finally:
                free.append(repo)
            return mutant

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for i, m in enumerate(pool.map(work, found), 1):
                print(f"[{i}/{len(found)}] {m.module}.py:{m.line} {m.text!r}: {m.outcome} "
                      f"({m.seconds:.0f} s)", flush=True)  # fmt: skip
                if args.json:  # as it goes, so that a stopped run keeps what it found
                    args.json.write_text(json.dumps([vars(m) for m in found], indent=1))
    print(report(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
