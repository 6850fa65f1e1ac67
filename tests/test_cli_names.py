"""The command line speaks the API's language: one name per concept, defaults shown in every help
screen, seeds kept apart (the data's and the training's), `--set` in one form."""
import json

import click
import typer
from typer.testing import CliRunner

from sparsecode.cli import app

runner = CliRunner()


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_option_of_every_command_shows_its_default():
    root = typer.main.get_command(app)
    missing = []
    for path, command in _commands(root):
        for param in command.params:
            if not isinstance(param, click.Option) or param.required or param.hidden:
                continue
            shown = isinstance(param.show_default, str) or (param.show_default is not False
                                                            and param.default not in (None, [], ()))
            if not shown:
                missing.append(f"sparsecode {' '.join(path)} {param.opts[0]}")
            # rich reads "[...]" in help text as markup and drops it: defaults go through show_default
            assert "[default" not in (param.help or ""), f"{' '.join(path)} {param.opts[0]}"
    assert not missing, "options without a default in their help: " + ", ".join(missing)


def test_a_described_default_reaches_the_help_screen():
    result = runner.invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    # typer puts a described default in parentheses
    assert "[default: (3 for synthetic data, else each encoder's own)]" in result.output
    assert "[default: (synthetic data)]" in result.output


def test_list_shows_learning_methods_with_their_options():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "dictionary learning methods" in result.output
    line = next(l for l in result.output.splitlines() if "sparse-coding" in l and "inference" in l)
    assert "n_iter" in line


def _compare(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    result = runner.invoke(app, ["compare", "--encoders", "omp,topk", "--n-samples", "64", "--n-train", "64",
                                 "--set", "topk.steps=3", "--set", "topk.batch_size=16", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_data_seed_draws_the_data_and_seed_seeds_training(tmp_path):
    base = _compare(tmp_path, "base")
    other_data = _compare(tmp_path, "data", "--data-seed", "1")
    other_training = _compare(tmp_path, "train", "--seed", "1")
    assert base["settings"]["seed"] == 0 and other_training["settings"]["seed"] == 1
    assert other_data["settings"]["data_seed"] == 1 and other_training["settings"]["data_seed"] == 0
    omp = {name: run["rows"][0] for name, run in (("base", base), ("data", other_data), ("train", other_training))}
    # omp has no training: only the data seed moves its numbers
    assert omp["train"]["fvu"] == omp["base"]["fvu"] and omp["data"]["fvu"] != omp["base"]["fvu"]
    # batches of 16 of the 64 training signals: the training seed picks their order
    topk = {name: run["rows"][1] for name, run in (("base", base), ("train", other_training))}
    assert topk["train"]["fvu"] != topk["base"]["fvu"]


def test_train_takes_the_qualified_set_form_and_shares_k(tmp_path):
    result = runner.invoke(app, ["train", "--method", "topk", "--n-atoms", "8", "--k", "2", "--set",
                                 "topk.steps=20", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "d-encoder.json").read_text())["config"]
    assert config["k"] == 2 and config["steps"] == 20
    # an explicit option of the method wins over the shared --k
    result = runner.invoke(app, ["train", "--method", "topk", "--n-atoms", "8", "--k", "2", "--set", "topk.k=3",
                                 "--set", "topk.steps=5", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e-encoder.json").read_text())["config"]["k"] == 3
    result = runner.invoke(app, ["train", "--method", "topk", "--n-atoms", "8", "--set", "relu.lam=1",
                                 "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "'relu' is not among" in result.stderr


def test_a_former_option_name_still_works_and_says_the_new_one(tmp_path):
    renamed = _compare(tmp_path, "old", "--train-seed", "1")
    assert renamed["settings"]["seed"] == 1
    result = runner.invoke(app, ["compare", "--encoders", "omp", "--n-samples", "8", "--train-seed", "2"])
    assert result.exit_code == 0 and "--train-seed is now --seed" in result.output
