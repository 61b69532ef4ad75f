"""The command line: listing commands, help texts, and usage errors as one line for every command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthgen.cli import _register, app, main

REPO = Path(__file__).resolve().parents[1]


def _tree():
    """(argv path, click command) for every group and command registered on the app."""
    import typer

    _register()
    root = typer.main.get_command(app)
    out, pending = [], [((), root)]
    while pending:
        path, cmd = pending.pop()
        out.append((path, cmd))
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            pending.append(((*path, name), sub))
    return out


COMMANDS = [(path, cmd) for path, cmd in _tree() if not hasattr(cmd, "commands")]
GROUPS = [(path, cmd) for path, cmd in _tree() if hasattr(cmd, "commands")]


def _one_error_line(capsys, argv: list[str], code: int | None = None) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc != 0 and (code is None or rc == code), (argv, rc, captured.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_the_tree_holds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"build", "verify", "prompts", "preview", "regenerate", "recipes list", "recipes show", "cas", "pretrain",
            "evaluate"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_unknown_option_is_one_line(capsys, path):
    line = _one_error_line(capsys, [*path, "--no-such-option"], code=2)
    assert "--no-such-option" in line and f"synthgen {' '.join(path)} --help" in line


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if any(a.required for a in c.params if a.param_type_name == "argument")],
                         ids=" ".join)
def test_missing_argument_is_one_line(capsys, path):
    line = _one_error_line(capsys, list(path), code=2)
    assert "Missing argument" in line


def _numeric_option(cmd):
    for param in cmd.params:
        if param.param_type_name == "option" and param.type_descriptor.annotation in (int, float):
            return param
    return None


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if _numeric_option(c)], ids=" ".join)
def test_bad_value_is_one_line(capsys, path):
    cmd = dict(COMMANDS)[path]
    option = _numeric_option(cmd)
    args = [a for a in cmd.params if a.param_type_name == "argument" and a.required]
    line = _one_error_line(capsys, [*path, *["x"] * len(args), option.opts[0], "abc"], code=2)
    assert option.opts[0] in line or "abc" in line


@pytest.mark.parametrize("path", [p for p, _ in GROUPS], ids=lambda p: " ".join(p) or "synthgen")
def test_no_command_prints_help_and_one_error_line(capsys, path):
    line = _one_error_line(capsys, list(path), code=2)
    assert "missing" in line and "--help" in line
    # the help is still printed, on stdout
    assert main([*path, "--help"]) == 0
    assert capsys.readouterr().out.startswith("Usage: synthgen")


@pytest.mark.parametrize("path", [("build",), ("pretrain",), ("evaluate",), ("cas",), ("classcond", "train"),
                                  ("classcond", "tune"), ("classcond", "finetune"), ("classcond", "run")], ids=" ".join)
def test_every_long_command_has_quiet(path):
    quiet = [p for p in dict(COMMANDS)[path].params if p.name == "quiet"]
    assert len(quiet) == 1 and sorted(quiet[0].opts) == ["--quiet", "-q"] and quiet[0].default is False


def test_synthgen_alone_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "synthgen"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: missing a command (see 'synthgen --help')"]
    assert "Commands:" in result.stdout and "build" in result.stdout


def _help_text(capsys, path) -> str:
    assert main([*path, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_help_shows_every_option_with_its_default(capsys, path):
    """Each option's help, bracketed notes included, reaches the screen whole; an option with a
    default shows it (rich markup used to eat "[default: ...]" as a tag)."""
    from typer._click.core import Context

    cmd = dict(COMMANDS)[path]
    shown = _help_text(capsys, path)
    ctx = Context(cmd, info_name=path[-1])
    checked = 0
    for param in cmd.params:
        if param.param_type_name != "option" or param.name == "help":
            continue
        record = param.get_help_record(ctx)
        assert record is not None, param.name
        text = " ".join(record[1].split())
        # compared without whitespace: the help formatter may also break lines after a hyphen
        assert "".join(text.split()) in "".join(shown.split()), (param.name, text)
        default = param.default
        if default is not None and default is not False and default != () and default != []:
            assert re.search(r"\[default: [^\]]+\]", text), (param.name, text)
            checked += 1
    if any(p.default not in (None, False, (), []) for p in cmd.params if p.param_type_name == "option" and p.name != "help"):
        assert checked


def test_piped_output_is_not_wrapped(tmp_path):
    """`recipes show` into a file is valid YAML, and table rows are not split at 80 columns."""
    env = {**os.environ, "COLUMNS": ""}
    shown = subprocess.run([sys.executable, "-m", "synthgen", "recipes", "show", "imagenet-sd"],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    data = yaml.safe_load(shown.stdout)
    assert data["name"] == "imagenet-sd" and "\n" not in data["description"]
    listed = subprocess.run([sys.executable, "-m", "synthgen", "recipes", "list"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    demo_rows = [line for line in listed.stdout.splitlines() if "builtin:tiny-sd" in line]
    assert len(demo_rows) == 1 and "Offline CPU demo" in demo_rows[0] and len(demo_rows[0]) > 120


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("build", "verify", "recipes", "prompts", "preview", "regenerate", "cas", "pretrain", "evaluate"):
        assert command in out
    # each command's first sentence whole, wrapped, not cut mid-sentence with "..."
    assert "..." not in out.split("Commands:")[1]
    assert "Hugging Face-style folder of parquet shards." in " ".join(out.split())


def test_recipes_list_and_show(capsys):
    assert main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "imagenet-sd", "imagenet100-sd", "stablerep-cc3m", "combinatorial"):
        assert name in out
    assert main(["recipes", "show", "demo", "--set", "generator.steps=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["count"] == 200 and shown["generator"]["steps"] == 3
    assert shown["output"]["resize_filter"] == "bicubic"  # defaults are filled in


def test_prompts_shows_requested_rows(capsys):
    assert main(["prompts", "combinatorial", "-n", "3", "--start", "10", "--tsv"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [int(r[0]) for r in rows] == [10, 11, 12]
    for index, label, group, prompt in rows:
        parts = prompt.split(", ")
        assert len(parts) == 5 and parts[0] == label  # category (the label), size, color, view, light


def test_unknown_recipe_is_one_line(capsys):
    line = _one_error_line(capsys, ["prompts", "no-such-recipe"], code=1)
    assert "unknown recipe 'no-such-recipe'" in line and "demo" in line


def test_ctrl_c_says_what_the_command_kept():
    from synthgen.cli import interrupted_line

    assert interrupted_line(["build", "demo"]) == "interrupted: finished shards are kept; run the same command again to resume"
    assert interrupted_line(["--recipes", "build", "pretrain", "x"]).startswith("interrupted: the last checkpoint is kept")
    assert interrupted_line(["classcond", "run", "classcond-tiny"]).startswith("interrupted: finished epochs and trials")
    assert interrupted_line(["cas", "x", "--real", "y"]) == interrupted_line([]) == "interrupted"


def test_a_misspelt_recipe_name_gets_the_close_ones(capsys):
    assert _one_error_line(capsys, ["prompts", "demoo"], code=1) == "error: unknown recipe 'demoo' (did you mean demo?)"
    line = _one_error_line(capsys, ["build", "imagenet_sd", "--dry-run"], code=1)
    assert line == "error: unknown recipe 'imagenet_sd' (did you mean imagenet-sd or imagenet100-sd?)"
    line = _one_error_line(capsys, ["pretrain", "rotation-vit-dem"], code=1)
    assert line == "error: unknown training recipe 'rotation-vit-dem' (did you mean rotation-vit-demo or rotation-vit?)"


def test_a_missing_recipe_folder_in_the_environment_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNTHGEN_RECIPES", str(tmp_path / "recipse"))
    line = _one_error_line(capsys, ["prompts", "mine"], code=1)
    assert line.endswith(f"; recipe folder(s) not found: {tmp_path / 'recipse'}")


def test_prompts_past_the_last_image_is_one_line(capsys):
    line = _one_error_line(capsys, ["prompts", "demo", "--start", "200"], code=1)
    assert line == "error: --start 200 is past the recipe's last image (200 images: 0..199)"
    assert main(["prompts", "demo", "--start", "198", "-n", "5", "--tsv"]) == 0  # a last page is cut short
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["198", "199"]


def test_a_broken_recipe_file_does_not_hide_the_others(tmp_path, monkeypatch, capsys):
    """`recipes list` lists every recipe that loads, marks the one that does not, prints its error
    and exits 1; each row's description is its first sentence."""
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv("SYNTHGEN_RECIPES", "")  # --recipes sets it in this process: restored after the test
    (mine / "broken.yaml").write_text("name: [oops\n")
    rc = main(["--recipes", str(mine), "recipes", "list"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert err.strip() == f"error: {mine / 'broken.yaml'}: malformed YAML (line 2, column 1): expected ',' or ']', but got '<stream end>'"
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert "does not load" in rows["broken"] and {"demo", "imagenet-sd", "stablerep-cc3m"} <= set(rows)
    assert "The images are noise-like" not in rows["demo"]  # the demo's second sentence


def test_a_recipe_name_is_not_a_folder_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """A folder (or extension-less file) named `demo` in the working directory does not hide the
    built-in recipe; `./demo` and `demo.yaml` are paths."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert main(["prompts", "demo", "-n", "1", "--tsv"]) == 0
    assert capsys.readouterr().out.startswith("0\t")
    line = _one_error_line(capsys, ["prompts", "./demo"], code=1)
    assert "demo is a folder, not a recipe file" in line
    line = _one_error_line(capsys, ["prompts", "demo.yaml"], code=1)
    assert "file not found: demo.yaml" in line


def test_user_recipe_folders(tmp_path, monkeypatch, capsys):
    """SYNTHGEN_RECIPES and --recipes add folders searched before the built-ins."""
    mine = tmp_path / "mine"
    mine.mkdir()
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    (mine / "tiny.yaml").write_text(yaml.safe_dump({**recipe, "name": "tiny", "count": 7}))
    monkeypatch.setenv("SYNTHGEN_RECIPES", "")  # no folders; --recipes below sets it, restored after the test
    _one_error_line(capsys, ["recipes", "show", "tiny"], code=1)
    assert main(["--recipes", str(mine), "recipes", "show", "tiny"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["count"] == 7
    monkeypatch.setenv("SYNTHGEN_RECIPES", str(mine))
    assert main(["recipes", "list"]) == 0
    listed = capsys.readouterr().out
    assert "tiny" in listed and str(mine) in listed and "built-in" in listed


def test_validation_message_names_the_value_once(capsys, tmp_path):
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    recipe["generator"]["height"] = 30
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    line = _one_error_line(capsys, ["prompts", str(path)], code=1)
    assert line.endswith("generator.height: must be a multiple of 8 (got 30)")


def test_a_missing_recipe_folder_is_a_usage_error(tmp_path, capsys):
    line = _one_error_line(capsys, ["--recipes", str(tmp_path / "nowhere"), "recipes", "list"], code=2)
    assert "--recipes" in line and "nowhere" in line


def test_dry_run_checks_the_executor_options(tmp_path, capsys, monkeypatch):
    """--dry-run refuses what the build would refuse before writing anything, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    line = _one_error_line(capsys, ["build", "demo", "--dry-run", "--executor", "nope"], code=1)
    assert "unknown executor 'nope'" in line
    line = _one_error_line(capsys, ["build", "demo", "--dry-run", "--num-workers", "2", "--worker-index", "5"], code=1)
    assert "--worker-index must be in [0, 2)" in line
    for alone in (["--num-workers", "2"], ["--worker-index", "1"]):  # one alone: every process the same share
        line = _one_error_line(capsys, ["build", "demo", "--dry-run", *alone], code=1)
        assert "--num-workers and --worker-index go together" in line
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _one_error_line(capsys, ["build", "demo", "--dry-run"], code=1)
    assert "RANK=3 is out of range" in line
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["build", "demo", "--dry-run", "--executor", "local"]) == 0
    assert "dry run: nothing was written" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
