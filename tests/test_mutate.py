"""The mutation-testing command plants the bugs it promises, and only those."""

import ast

import mutate  # tests/mutate.py

SOURCE = '''"""Module docstring 1 + 2."""

SCALE: float = 2.0


def f(x: int = 3, *, name: str = "é") -> float:
    """Docstring with 1 < 2."""
    print(f"{x + 1}")
    y = -x * SCALE  # pragma: no mutate
    if x < 0 and not name:
        return x - 1
    return x ** 2 if x is None else True
'''


def _mutants(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(SOURCE, encoding="utf-8")
    return mutate.mutants(path)


def test_each_operator_gives_its_one_mutant(tmp_path):
    found = {(m.line, m.before, m.text) for m in _mutants(tmp_path)}
    assert found == {
        (3, "2.0", "(3.0)"),
        (6, "3", "(4)"),
        (8, 'print(f"{x + 1}")', "pass"),
        (10, "x < 0 and not name", "(x < 0 or not name)"),
        (10, "x < 0", "(x <= 0)"),
        (10, "0", "(1)"),
        (10, "not name", "(name)"),
        (11, "x - 1", "(x + 1)"),
        (11, "1", "(2)"),
        (12, "x ** 2", "(x * 2)"),
        (12, "2", "(3)"),
        (12, "x is None", "(x is not None)"),
        (12, "True", "(False)"),
    }


def test_mutants_apply_at_the_right_place_after_non_ascii_text(tmp_path):
    for m in _mutants(tmp_path):
        changed = m.apply(SOURCE)
        ast.parse(changed)
        old, new = SOURCE.splitlines(), changed.splitlines()
        assert [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b] == [m.line - 1]
        assert new[m.line - 1].replace(m.text, m.before, 1) == old[m.line - 1]


def test_every_module_of_the_layers_that_change_most_has_its_tests():
    repo = mutate.REPO
    for folder in ("training", "workdir", "commands"):
        for path in sorted((repo / "sae_jax" / folder).glob("[!_]*.py")):
            module = mutate.module_name(path)
            assert module in mutate.TESTS, f"tests/mutate.py: TESTS has no entry for {module}"
    assert "cli/main" in mutate.TESTS
    for module, files in mutate.TESTS.items():
        assert (repo / "sae_jax" / f"{module}.py").is_file(), module
        for name in files:
            assert (repo / "tests" / name).is_file(), f"{module}: no tests/{name}"


def test_a_sample_draws_as_many_of_each_module_reproducibly(tmp_path):
    found = _mutants(tmp_path)
    other = [mutate.Mutant(**{**vars(m), "module": "other"}) for m in found]
    both = found + other
    picked = mutate.sampled(both, 4, seed=1)
    modules = [m.module for m in picked]
    assert modules.count(found[0].module) == 4 == modules.count("other")
    assert picked == mutate.sampled(both, 4, seed=1) != mutate.sampled(both, 4, seed=2)
    assert [m for m in picked if m in found] == [m for m in found if m in picked]  # in order
    assert mutate.sampled(found, 100, seed=0) == found
