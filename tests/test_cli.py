"""The CLI's listing commands: recipes, prompts, --help."""

from __future__ import annotations

import yaml

from synthgen.cli import main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("build", "recipes", "prompts", "preview", "regenerate", "cas", "pretrain", "evaluate"):
        assert command in out


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
    assert main(["prompts", "no-such-recipe"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe 'no-such-recipe'" in err[0]
