"""The `videollava` command on a base install: without the `web` and `train` extras (gradio, peft,
matplotlib), every `--help` works and the commands that need an extra say which one, at once.

The base install is made by hiding packages from a child interpreter: a `sitecustomize` module on
its PYTHONPATH puts a finder first on `sys.meta_path` that answers "no such module" for them, as
an interpreter without them installed does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from videollava.cli import SUBCOMMANDS, main
from videollava.train.config import load_recipe
from videollava.train.runner import required_modules

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EXTRAS = ("gradio", "peft", "matplotlib")

HIDE_MODULES = """
import os
import sys

HIDDEN = {name for name in os.environ.get("HIDDEN_MODULES", "").split(",") if name}


class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Hide())
"""

# Runs each command line of argv[1] (JSON) through videollava.cli.main in this one interpreter
# (imports are paid once), and prints what each wrote and returned.
RUN_COMMANDS = """
import contextlib
import io
import json
import sys

from videollava.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
imported = sorted(name for name in sys.modules if name.split(".")[0] in ("gradio", "peft", "matplotlib"))
print(json.dumps({"results": results, "imported": imported}))
"""


def run_python(tmp_path: Path, args: list[str], hidden: tuple[str, ...], cwd: Path | None = None):
    (tmp_path / "sitecustomize.py").write_text(HIDE_MODULES)
    path = os.pathsep.join([str(tmp_path), str(ROOT / "src"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "HIDDEN_MODULES": ",".join(hidden)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd or tmp_path
    )


def one_line_error(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def base_install(tmp_path_factory) -> tuple[dict[tuple[str, ...], dict], list[str], Path]:
    """Every case run once, in one interpreter where the extras' packages cannot be imported."""
    tmp = tmp_path_factory.mktemp("base-install")
    out = tmp / "smoke-run"
    cases = [
        [],
        ["--help"],
        ["aks", "How many?"],
        ["serv"],
        *([name, "--help"] for name in SUBCOMMANDS),
        ["eval", "shapesworld", "--help"],
        ["shapesworld", "generate", "--help"],
        # A model that does not exist: the missing extra must be reported before any loading.
        ["web", "--model", str(tmp / "no-such-model")],
        ["train", str(CONFIGS / "shapesworld-smoke.yaml"), "--output", str(out)],
    ]
    (tmp / "run_commands.py").write_text(RUN_COMMANDS)
    result = run_python(tmp, [str(tmp / "run_commands.py"), json.dumps(cases)], EXTRAS)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    return {tuple(r["argv"]): r for r in report["results"]}, report["imported"], out


def test_hidden_packages_are_really_hidden(tmp_path):
    result = run_python(tmp_path, ["-c", "import gradio"], EXTRAS)
    assert result.returncode == 1 and "ModuleNotFoundError: No module named 'gradio'" in result.stderr


def test_every_help_works_without_the_extras(base_install):
    results, imported, _ = base_install
    top = results[("--help",)]
    assert top["code"] == 0
    for name in SUBCOMMANDS:
        assert f"    {name}" in top["out"]
        sub = results[(name, "--help")]
        assert sub["code"] == 0 and sub["err"] == "", (name, sub["err"])
        assert sub["out"].startswith(f"usage: videollava {name} "), sub["out"][:200]
    assert "usage: videollava eval shapesworld" in results[("eval", "shapesworld", "--help")]["out"]
    assert "--out OUT" in results[("shapesworld", "generate", "--help")]["out"]
    # Registering subcommands never imported an extra (it could not have, and nothing asked).
    assert imported == []


def test_bare_command_and_typos(base_install):
    results, _, _ = base_install
    bare = results[()]
    assert bare["code"] == 2 and bare["out"] == ""
    assert bare["err"].startswith("usage: videollava") and "ask" in bare["err"] and "web" in bare["err"]
    typo = results[("aks", "How many?")]
    assert typo["code"] == 2 and typo["out"] == ""
    assert one_line_error(typo["err"]) == "videollava: error: unknown command 'aks'; did you mean 'ask'?"
    assert "did you mean 'serve'?" in one_line_error(results[("serv",)]["err"])


def test_web_without_gradio_names_the_extra_before_loading(base_install):
    results, _, _ = base_install
    web = next(r for argv, r in results.items() if argv[:1] == ("web",) and "--help" not in argv)
    assert web["code"] == 2 and web["out"] == ""
    line = one_line_error(web["err"])
    assert "gradio" in line and "pip install 'videollava[web]'" in line
    assert "no-such-model" not in line  # the model was never looked for


def test_train_without_matplotlib_names_the_extra_before_any_work(base_install):
    results, _, out = base_install
    train = next(r for argv, r in results.items() if argv[:1] == ("train",) and "--help" not in argv)
    assert train["code"] == 2 and train["out"] == ""
    line = one_line_error(train["err"])
    assert "matplotlib" in line and "pip install 'videollava[train]'" in line
    assert not out.exists()  # no run folder, no generated data


def test_lora_recipes_need_peft_too():
    assert required_modules(load_recipe(CONFIGS / "shapesworld-smoke.yaml")) == ["matplotlib"]
    assert required_modules(load_recipe(CONFIGS / "videollava-7b-lora.yaml")) == ["matplotlib", "peft"]


def test_console_entry_point_on_a_base_install(tmp_path):
    """`python -m videollava --help`, as a user runs it, lists every command without importing one."""
    result = run_python(tmp_path, ["-X", "importtime", "-m", "videollava", "--help"], EXTRAS)
    assert result.returncode == 0 and all(f"    {name}" in result.stdout for name in SUBCOMMANDS)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "videollava.cli" in imported and not imported & {"torch", "transformers", "fastapi"}


def test_a_missing_base_dependency_is_named_even_for_help(tmp_path):
    result = run_python(tmp_path, ["-m", "videollava", "serve", "--help"], ("fastapi",))
    assert result.returncode == 2 and result.stdout == ""
    line = one_line_error(result.stderr)
    assert "fastapi" in line and "pip install videollava" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["ask", "--batch-size", "0", "--batch", "x.jsonl"],
            "argument --batch-size: must be at least 1, got 0",
        ),
        (["ask", "--frames", "two", "hi"], "argument --frames: expected a whole number, got 'two'"),
        (["web", "--port", "70000"], "argument --port: a port is 0-65535, got 70000"),
        (["serve", "--port", "-1"], "argument --port: a port is 0-65535, got -1"),
        (["chat", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["eval", "shapesworld", "--data", "d", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (
            ["eval", "shapesworld", "--data", "d", "--batch-size", "-1"],
            "argument --batch-size: must be at least 1",
        ),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert message in one_line_error(err)
