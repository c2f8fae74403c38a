"""The manual still describes the repository: README.md, INSTALL.md, docs/*.md, datasets/README.md
and projects/*/README.md.

* every repository script that a ```bash block runs (``python tools/X.py``, ``.venv/bin/python
  projects/P/train_net.py``, ``python -m expedit_d2.sweep``, ``bash tools/X.sh``) exists, and each
  Python one answers ``--help`` (one subprocess per distinct script, run in parallel) listing
  every ``--option`` the manual passes it;
* every config file a command names (``--config-file``, ``--sweep-file``, any ``*.yaml``
  argument) and every ``*.yaml`` path quoted in the text exists (Detectron2's own model-zoo
  configs are looked up there);
* ```yaml blocks merge into a config with expedit-d2's (and the projects') keys, and ```python
  blocks parse and name only what ``expedit_d2`` has;
* every relative link ``[text](path#anchor)`` resolves to a file or folder of the repository,
  and its anchor to a heading of the target;
* user pages carry no commit hashes or dates (the dated log, docs/benchmarks-log.md, does).
"""
import ast
import concurrent.futures
import functools
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "docs" / "benchmarks-log.md"
HELP_TIMEOUT_S = 120


def doc_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", root / "INSTALL.md", root / "datasets" / "README.md",
             *sorted((root / "docs").glob("*.md")), *sorted((root / "projects").glob("*/README.md"))]
    return [f for f in files if f.is_file()]


def rel(path: Path, root: Path = ROOT) -> str:
    return str(path.relative_to(root))


# --------------------------------------------------------------------------------------
# markdown structure
# --------------------------------------------------------------------------------------
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def fenced_blocks(text: str):
    """(language, body, first body line number) of every fenced block."""
    for m in FENCE.finditer(text):
        yield m.group(1).lower(), m.group(2), text.count("\n", 0, m.start(2)) + 1


def prose(text: str) -> str:
    """The text with fenced blocks blanked (line numbers kept)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", prose(text), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# --------------------------------------------------------------------------------------
# shell commands in ```bash blocks
# --------------------------------------------------------------------------------------
@dataclass
class Command:
    doc: str
    line: int
    words: list[str]

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass
class Script:
    """A repository script the manual runs: its path (or ``-m module``) and the options passed."""
    argv: tuple[str, ...]  # ("tools/demo.py",) or ("-m", "expedit_d2.sweep") or ("bash", "x.sh")
    path: Path
    options: dict[str, str] = field(default_factory=dict)  # --option -> first place used


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")
_ASSIGN = re.compile(r"^[A-Za-z_]\w*=")
_SEPARATORS = {";", "&&", "||", "|", "&"}


def _expand(word: str, env: dict[str, str]) -> str:
    def sub(m):
        name = m.group(1) or m.group(3)
        if name in env:
            return env[name]
        return m.group(2) if m.group(2) is not None else m.group(0)
    return _VAR.sub(sub, word)


def _split(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        if token in _SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def bash_commands(doc: Path, root: Path = ROOT) -> list[Command]:
    """The simple commands of the doc's ```bash/```sh blocks, variables (assignments of the
    doc's earlier lines, ${X:-default}) and for-loops expanded."""
    text = doc.read_text()
    env: dict[str, str] = {}
    out = []
    for lang, body, first in fenced_blocks(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        lines = body.split("\n")
        loops: list[tuple[str, list[str]]] = []
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            i += 1
            for words in _split(line):
                if words[0] == "do":
                    words = words[1:]
                if not words:
                    continue
                if words[0] == "done":
                    loops.pop()
                    continue
                if words[0] == "for" and len(words) >= 3 and words[2] == "in":
                    loops.append((words[1], [_expand(w, env) for w in words[3:]]))
                    continue
                while words and _ASSIGN.match(words[0]):
                    name, value = words[0].split("=", 1)
                    if len(words) == 1:
                        env[name] = _expand(value, env)
                    words = words[1:]
                if not words:
                    continue
                variants = [dict(env)]
                for name, values in loops:
                    variants = [{**v, name: value} for v in variants for value in values]
                for v in variants:
                    out.append(Command(rel(doc, root), first + start, [_expand(w, v) for w in words]))
    return out


def script_of(cmd: Command, root: Path = ROOT) -> Script | None:
    """The repository script a command runs (None: not one of ours, e.g. pytest, for, cd)."""
    w = cmd.words
    if Path(w[0]).name in ("bash", "sh") and len(w) > 1 and not w[1].startswith("-"):
        return Script(("bash", w[1]), root / w[1])
    if not re.fullmatch(r"python[\d.]*", Path(w[0]).name) or len(w) < 2:
        return None
    if w[1] == "-m":
        module = w[2]
        if not module.startswith("expedit_d2"):
            return None  # pytest, pip, ...
        base = root / module.replace(".", "/")
        path = base / "__main__.py" if base.is_dir() else base.with_suffix(".py")
        return Script(("-m", module), path)
    if w[1].startswith("-"):
        return None
    return Script((w[1],), root / w[1])


def options_of(cmd: Command) -> list[str]:
    opts = []
    for word in cmd.words[1:]:
        word = word.strip("[]")
        if re.match(r"--[a-z]", word):
            opts.append(word.split("=", 1)[0])
    return opts


def config_paths_of(cmd: Command) -> list[str]:
    """Config files a command names: --config-file/--sweep-file values and any *.yaml word."""
    words = [w.strip("[]") for w in cmd.words]
    paths = [b for a, b in zip(words, words[1:]) if a in ("--config-file", "--sweep-file")]
    paths += [w for w in words if w.endswith((".yaml", ".yml")) and w not in paths]
    return paths


def collect_scripts(docs: list[Path], root: Path = ROOT) -> tuple[dict[tuple, Script], list[str]]:
    """Every script the docs run, with the options used, and the problems found on the way
    (missing scripts or config files)."""
    scripts: dict[tuple, Script] = {}
    problems = []
    for doc in docs:
        for cmd in bash_commands(doc, root):
            for path in config_paths_of(cmd):
                if "$" in path:
                    problems.append(f"{cmd.where}: config path {path!r} has a variable the page never sets")
                elif not (root / path).is_file():
                    problems.append(f"{cmd.where}: config file {path} does not exist")
            script = script_of(cmd, root)
            if script is None:
                continue
            if not script.path.is_file():
                problems.append(f"{cmd.where}: {' '.join(script.argv)} does not exist ({script.path})")
                continue
            known = scripts.setdefault(script.argv, script)
            for opt in options_of(cmd):
                known.options.setdefault(opt, cmd.where)
    return scripts, problems


def help_problems(script: Script, root: Path = ROOT) -> list[str]:
    if script.argv[0] == "bash":
        run = subprocess.run(["bash", "-n", str(script.path)], capture_output=True, text=True)
        return [] if run.returncode == 0 else [f"bash -n {script.argv[1]}: {run.stderr.strip()}"]
    name = " ".join(script.argv)
    try:
        run = subprocess.run([sys.executable, *script.argv, "--help"], cwd=root, capture_output=True,
                             text=True, timeout=HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"{name} --help did not finish in {HELP_TIMEOUT_S} s"]
    if run.returncode != 0:
        return [f"{name} --help exited {run.returncode}: {run.stderr.strip()[-1500:]}"]
    return [f"{where}: {name} has no option {opt} (its --help does not list it)"
            for opt, where in sorted(script.options.items())
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", run.stdout)]


# --------------------------------------------------------------------------------------
# links and quoted paths
# --------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def link_problems(doc: Path, root: Path = ROOT) -> list[str]:
    text = prose(doc.read_text())
    problems = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        where = f"{rel(doc, root)}:{text.count(chr(10), 0, m.start()) + 1}"
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if root.resolve() not in [dest, *dest.parents]:
            problems.append(f"{where}: link {target} leaves the repository")
        elif not dest.exists():
            problems.append(f"{where}: link {target} points to nothing")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{where}: link {target}: no heading #{anchor} in {rel(dest, root)}")
    return problems


def _brace_expand(word: str) -> list[str]:
    m = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not m:
        return [word]
    return [x for part in m.group(1).split(",")
            for x in _brace_expand(word[:m.start()] + part + word[m.end():])]


@functools.lru_cache(maxsize=None)
def _model_zoo_config_exists(path: str) -> bool:
    import expedit_d2  # noqa: F401  (first: quiets Detectron2's import-time warnings)
    from detectron2 import model_zoo
    try:
        model_zoo.get_config_file(path)
    except RuntimeError:
        return False
    return True


def quoted_config_problems(doc: Path, root: Path = ROOT) -> list[str]:
    """Every `path/to/x.yaml` code span of the text names a file (of the repository, relative
    to the page or to its project, or of Detectron2's model zoo)."""
    text = prose(doc.read_text())
    bases = [root, doc.parent]
    problems = []
    for m in re.finditer(r"`([\w./{},*-]+\.ya?ml)`", text):
        quoted = m.group(1)
        if "/" not in quoted or "..." in quoted:
            continue
        for path in _brace_expand(quoted):
            if any(glob.glob(str(base / path)) for base in bases) or _model_zoo_config_exists(path):
                continue
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{rel(doc, root)}:{line}: {path} does not exist")
    return problems


# --------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------
def test_the_manual_pages_exist():
    names = {rel(f) for f in doc_files()}
    for page in ("README.md", "INSTALL.md", "docs/methods.md", "docs/families.md", "docs/fidelity.md",
                 "docs/sweeps.md", "docs/benchmarks.md", "docs/benchmarks-log.md", "docs/cpu.md",
                 "docs/gpu.md", "docs/drop-in.md", "projects/Mask2Former/README.md",
                 "projects/DPT/README.md"):
        assert page in names, page


def test_readme_is_a_short_manual_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    # the two commands, verbatim; .ci/run runs the second one exactly
    assert "\nbash tools/install.sh && .venv/bin/python tools/demo.py\n" in readme
    assert "\nbash tools/install.sh && .venv/bin/python -m pytest\n" in readme
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("bash tools/install.sh && .venv/bin/python -m pytest")
    section = readme.split("\n## Expedite your own Detectron2 project\n", 1)
    assert len(section) == 2 and "[docs/drop-in.md](docs/drop-in.md)" in section[1]


def test_commands_name_existing_scripts_and_configs():
    scripts, problems = collect_scripts(doc_files())
    assert not problems, "\n".join(problems)
    # the parser does see the manual's commands (a broken parser would check nothing)
    assert {("tools/demo.py",), ("projects/Mask2Former/train_net.py",), ("projects/DPT/train_net.py",),
            ("-m", "expedit_d2.sweep"), ("tools/benchmark_model.py",), ("bash", "tools/install.sh")} <= set(scripts)
    assert "--eval-only" in scripts[("projects/Mask2Former/train_net.py",)].options


def test_scripts_answer_help_with_every_option_the_manual_uses():
    scripts, _ = collect_scripts(doc_files())
    workers = max(2, min(4, os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        problems = [p for ps in pool.map(help_problems, scripts.values()) for p in ps]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: rel(p))
def test_links_and_quoted_configs_resolve(doc):
    problems = link_problems(doc) + quoted_config_problems(doc)
    assert not problems, "\n".join(problems)


def _config_with_every_key():
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    import expedit_d2
    from dpt.config import add_dpt_config
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    expedit_d2.add_expedit_config(cfg)
    add_maskformer2_config(cfg)
    add_dpt_config(cfg)
    return cfg


def test_yaml_blocks_merge_into_the_config():
    import yaml
    from detectron2.config import CfgNode

    blocks = [(doc, first, body) for doc in doc_files() for lang, body, first in fenced_blocks(doc.read_text())
              if lang in ("yaml", "yml")]
    assert blocks  # README's drop-in example at least
    for doc, first, body in blocks:
        data = yaml.safe_load(body)
        if not isinstance(data, dict) or "_BASE_" in data:
            continue
        cfg = _config_with_every_key()
        try:
            cfg.merge_from_other_cfg(CfgNode(data))
        except (KeyError, ValueError) as e:
            pytest.fail(f"{rel(doc)}:{first}: the yaml block does not merge: {e}")


def _names_missing_from_expedit_d2(tree: ast.AST) -> list[str]:
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "expedit_d2":
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                missing.append(node.module)
                continue
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "expedit_d2":
                    try:
                        importlib.import_module(a.name)
                    except ImportError:
                        missing.append(a.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "expedit_d2":
            if not hasattr(importlib.import_module("expedit_d2"), node.attr):
                missing.append(f"expedit_d2.{node.attr}")
    return missing


def test_python_blocks_parse_and_name_what_expedit_d2_has():
    blocks = [(doc, first, body) for doc in doc_files() for lang, body, first in fenced_blocks(doc.read_text())
              if lang in ("python", "py")]
    assert blocks
    for doc, first, body in blocks:
        try:
            tree = ast.parse(body)
        except SyntaxError as e:
            pytest.fail(f"{rel(doc)}:{first + (e.lineno or 1) - 1}: the python block does not parse: {e.msg}")
        missing = _names_missing_from_expedit_d2(tree)
        assert not missing, f"{rel(doc)}:{first}: no such name: {missing}"


# a commit-like hex word (7-40 characters, digits and letters; not part of a file name such as
# dpt_hybrid_nyu-2ce69ec7.pt, nor a shortened checksum such as 5d2e9e51...) or an ISO date
HASH = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w/-])(?!\.[\w.])")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


@pytest.mark.parametrize("doc", [d for d in doc_files() if d != LOG], ids=lambda p: rel(p))
def test_user_pages_carry_no_commit_hashes_or_dates(doc):
    found = [f"{rel(doc)}:{i}: {m.group(0)}" for i, line in enumerate(doc.read_text().splitlines(), 1)
             for m in (*HASH.finditer(line), *DATE.finditer(line))]
    assert not found, "commit hashes and dates belong in docs/benchmarks-log.md:\n" + "\n".join(found)
