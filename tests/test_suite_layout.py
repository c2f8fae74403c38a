"""The suite's own rule: no test file imports another; what they share lives in conftest.py
fixtures and in the helper modules beside it (tests/*.py not named test_*)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imports_of_test_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``tests.test_*`` module in ``path`` (nested imports
    and relative ones included; strings are not imports)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module if node.level == 0 else ("tests." + (node.module or "")).rstrip(".")
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names
                if n.startswith("tests.") and any(part.startswith("test_") for part in n.split(".")[1:])]
    return out


def test_no_test_file_imports_another():
    files = sorted(TESTS.glob("*.py"))  # test files, conftest.py and the helper modules
    assert len(files) > 30 and TESTS / "conftest.py" in files  # the listing works
    found = [f"{path.name}:{line} imports {module}" for path in files for line, module in imports_of_test_modules(path)]
    assert not found, "shared test code belongs in conftest.py fixtures or a helper module:\n" + "\n".join(found)


def test_the_rule_sees_every_form_of_import(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import tests.test_ops\nfrom tests.test_sweep import x\nfrom tests import test_tools\n"
                     "from .test_vit_backbone import y\nfrom . import test_cli\ndef f():\n    from tests.test_sam import z\n"
                     "from tests.numerics import assert_close_f32\nS = 'import tests.test_fileio'\n")
    found = {module.split(".")[1] for _, module in imports_of_test_modules(probe)}
    assert found == {"test_ops", "test_sweep", "test_tools", "test_vit_backbone", "test_cli", "test_sam"}
