"""README.md stays true: its Python blocks run, and its usage lines name only real flags."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
CLIS = {
    "stairs-export": ("export.cli", "main"),
    "stairs-generate": ("engine.cli", "main"),
    "stairs-tune": ("engine.cli", "tune_main"),
    "stairs-bench": ("bench.cli", "main"),
    "stairs-verify": ("engine.cli", "verify_main"),
    "stairs-serve": ("serve.cli", "main"),
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def blocks(lang: str, text: str | None = None) -> list[str]:
    """The bodies of the ```lang fenced blocks."""
    text = README.read_text() if text is None else text
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def usage_lines() -> dict[str, list[str]]:
    """command -> its usage lines (continuations joined, comments dropped) from the ```bash
    block under '## Usage'."""
    text = README.read_text()
    section = text.split("\n## Usage", 1)[1].split("\n## ", 1)[0]
    (body,) = blocks("bash", section)[:1]
    out: dict[str, list[str]] = {}
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s#.*", "", line).strip()
        cmd = line.split(" ", 1)[0]
        if cmd.startswith("stairs-"):
            out.setdefault(cmd, []).append(line)
    return out


def help_text(cmd: str) -> str:
    """What `cmd --help` prints, from the entry point's main(["--help"])."""
    if cmd not in CLIS:
        pytest.fail(f"README's usage names {cmd}, which is no known command ({', '.join(CLIS)})")
    module, func = CLIS[cmd]
    try:
        main = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"README's usage names {cmd}, but {module}.{func} is missing: {exc}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code in (0, None)
    return out.getvalue()


# A README line `print(EXPR)  # True` promises that it prints True; the test holds it to that.
TRUE_LINE = re.compile(r"^(?P<indent>[ \t]*)print\((?P<expr>.*)\)[ \t]*#[ \t]*True[ \t]*$")
ANNOTATED = re.compile(r"#[ \t]*True[ \t]*$")


def checked_true(src: str, name: str) -> tuple[str, int]:
    """src with every `print(EXPR)  # True` line made to print EXPR and fail unless it is True,
    and the number of such lines. A `# True` comment on any other line is an error."""
    lines, n = [], 0
    for no, line in enumerate(src.splitlines(), 1):
        if ANNOTATED.search(line):
            m = TRUE_LINE.match(line)
            assert m, f"{name} line {no}: '# True' annotates only a one-line print(...): {line!r}"
            line = f"{m['indent']}__readme_true__(({m['expr']}), {name!r}, {no}, {m['expr']!r})"
            n += 1
        lines.append(line)
    return "\n".join(lines) + "\n", n


def readme_true(value, name: str, no: int, expr: str) -> None:
    """What an annotated print does under the test: print the value, which must be True."""
    print(value)
    assert value is True, f"{name} line {no}: {expr} printed {value!r}; README says True"


def run_block(src: str, name: str) -> int:
    """Execute one README Python block with its `# True` lines checked; returns their number."""
    src, n = checked_true(src, name)
    code_obj = compile(src, name, "exec")
    exec(code_obj, {"__name__": "__readme__", "__readme_true__": readme_true})  # noqa: S102
    return n


def test_true_annotations_fail_on_false(capsys):
    """A `# True` line that prints False (or anything but True) fails; True passes."""
    assert run_block("x = 2\nprint(x == 2)  # True\n", "ok") == 1
    assert capsys.readouterr().out == "True\n"
    with pytest.raises(AssertionError, match="printed False; README says True"):
        run_block("print(1 == 2)  # True\n", "bad")
    with pytest.raises(AssertionError, match="printed 1"):
        run_block("print(1)  # True\n", "truthy")
    with pytest.raises(AssertionError, match="annotates only"):
        run_block("y = 1 == 2  # True\n", "not a print")


def test_readme_python_blocks_run(pycode_pair, capsys):
    """Every ```python block, with the models/ paths pointed at the exported pair, runs, and
    every line README annotates `# True` prints True."""
    main, assistant = pycode_pair
    code = blocks("python")
    assert code, "README.md has no ```python block"
    checked = 0
    for i, src in enumerate(code):
        assert "models/pycode-t5-main" in src or "Engine" not in src
        src = src.replace("models/pycode-t5-main", str(main))
        src = src.replace("models/pycode-t5-draft", str(assistant))
        checked += run_block(src, f"README.md python block {i + 1}")
    assert checked, "README's Python blocks show no `# True` check (the exactness claim)"
    assert capsys.readouterr().out.strip(), "the Python API example printed nothing"


def test_readme_usage_parsing_finds_the_commands():
    assert set(usage_lines()) >= {"stairs-export", "stairs-generate", "stairs-bench"}


@pytest.mark.parametrize("cmd", sorted(usage_lines()))
def test_readme_usage_flags_exist(cmd):
    """Every --flag that README's usage gives a command is in that command's --help."""
    text = help_text(cmd)
    flags = sorted({f for line in usage_lines()[cmd] for f in FLAG.findall(line)})
    assert flags or cmd == "stairs-verify", f"no flags found for {cmd}"  # verify takes DIR only
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing, f"README's usage gives {cmd} flags its --help lacks: {missing}"
