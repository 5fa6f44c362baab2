"""The layout of tests/: shared code lives in tests/helpers, and no module imports a test
module (a file named test_*.py), so changing one test file cannot break another; every test
file is in unit/, integration/ or gpu/, each folder a package.

The imports are read from the source (ast), so an import inside a function counts too, and
relative imports are resolved against the importing file's package. The benchmarks in
bench/ are held to the same rule."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_FOLDERS = ("unit", "integration", "gpu")


def module_name(path: Path, root: Path) -> str:
    """The dotted name `path` imports as from `root` (a package by its folder's name)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, root: Path):
    """(line, dotted name) of everything the file's imports may name: `import a.b` names
    a.b; `from a import b` names a and a.b (b may be a module)."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from . import x` (level 1: this package), `from .. import x`
                parent = package[:len(package) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def imports_of_test_modules(root: Path, files) -> list:
    """(file, line, test module) of every import in `files` that names a test module, a
    test_*.py file anywhere under root/tests."""
    test_modules = {module_name(p, root) for p in (root / "tests").rglob("test_*.py")}
    found = []
    for path in sorted(files):
        for line, name in imported_names(path, root):
            parts = name.split(".")
            for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                if prefix in test_modules:
                    found.append((path.relative_to(root).as_posix(), line, prefix))
                    break
    return sorted(set(found))


def checked_files(root: Path):
    return [*(root / "tests").rglob("*.py"), *(root / "bench").glob("*.py")]


def test_no_module_imports_a_test_module():
    found = imports_of_test_modules(REPO, checked_files(REPO))
    assert not found, "test modules imported (move what they share to tests/helpers):\n" + \
        "\n".join(f"{f}:{line}: {m}" for f, line, m in found)


def test_the_import_check_finds_a_test_module_imported_in_every_form(tmp_path):
    files = {
        "tests/__init__.py": "",
        "tests/helpers/__init__.py": "",
        "tests/helpers/rows.py": "def rows():\n    return []\n",
        "tests/helpers/bad.py": "from tests.unit import test_a\n",
        "tests/unit/__init__.py": "",
        "tests/unit/test_a.py": "from tests.helpers.rows import rows\n\n\ndef helper():\n"
                                "    return rows()\n",
        "tests/unit/test_b.py": "import math\nfrom tests.unit.test_a import helper\n",
        "tests/unit/test_c.py": "from . import test_a\nfrom .test_a import helper\n"
                                "from ..helpers import rows\n",
        "tests/integration/__init__.py": "",
        "tests/integration/test_d.py": "def test_x():\n    import tests.unit.test_a\n",
        "tests/test_old.py": "X = 1\n",
        "tests/integration/test_e.py": "from tests.test_old import X\n",
        "bench/bench_x.py": "import tests.unit.test_a as a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert imports_of_test_modules(tmp_path, checked_files(tmp_path)) == [
        ("bench/bench_x.py", 1, "tests.unit.test_a"),
        ("tests/helpers/bad.py", 1, "tests.unit.test_a"),
        ("tests/integration/test_d.py", 2, "tests.unit.test_a"),
        ("tests/integration/test_e.py", 1, "tests.test_old"),
        ("tests/unit/test_b.py", 2, "tests.unit.test_a"),
        ("tests/unit/test_c.py", 1, "tests.unit.test_a"),
        ("tests/unit/test_c.py", 2, "tests.unit.test_a"),
    ]


def test_test_files_are_in_unit_integration_or_gpu_and_every_folder_is_a_package():
    tests = REPO / "tests"
    misplaced = [p.relative_to(REPO).as_posix() for p in tests.rglob("test_*.py")
                 if p.parent.parent != tests or p.parent.name not in TEST_FOLDERS]
    assert not misplaced, f"test files outside tests/{{{','.join(TEST_FOLDERS)}}}: {misplaced}"
    folders = {p.parent for p in tests.rglob("*.py")}
    assert all((f / "__init__.py").is_file() for f in folders), sorted(
        f.relative_to(REPO).as_posix() for f in folders if not (f / "__init__.py").is_file())
