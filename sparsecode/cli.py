"""The `sparsecode` command: argument parsing, printing and progress display; the work is done by
the library. The only module that prints."""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import _io, distributed, encoder_file, native, training
from .activations import (ActivationStore, ExtractConfig, Hookpoint, compute_normalization, evaluate, extract,
                          load_model, read_corpus)
from .bench import ranks as bench_ranks_run, scale, speed
from .checkpoint import checkpoints
from ._validation import check_int_range, describe_device
from .compare import Comparison, compare as run_compare
from .data import TRUE_DICTIONARY, comparison_data, load_dictionary, planted_split, training_data
from .dictionary import FORMAT as DICTIONARY_FORMAT, as_dictionary, load_sae_dictionary
from .encoder import coerce_field, suggest
from .learning import REFERENCE_METHODS, learn_dictionary, learning_methods, method_options
from .plots import firing_histogram, scale_figure
from .recovery import default_out, preset as get_preset, recovery
from .registry import COST_SIZE, available_encoders, encoder_class, get_encoder
from .sae_formats import check_export_folder, export_saelens

#: errors a user can act on: bad input, a file that cannot be read or written, a missing package
EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)
DEBUG_KEY = "sparsecode.debug"


def _error_line(message: str) -> None:
    """One plain line on stderr (rich would wrap a long message over several lines); under a
    launcher it names the rank, since torchrun shows the first failing rank's output."""
    where = f"rank {os.environ.get('RANK', '?')}: " if distributed.launched() else ""
    click.echo(f"error: {where}{' '.join(str(message).split())}", err=True)


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


class _Commands(typer.core.TyperGroup):
    """The one place where errors become exit codes: an expected error from any command (and any
    sub-command group) prints one line and exits 2, an interruption exits 130; `--debug` (or
    SPARSECODE_DEBUG=1) lets the exception through with its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (*EXPECTED_ERRORS, KeyboardInterrupt) as err:
            if ctx.meta.get(DEBUG_KEY):
                raise
            if isinstance(err, KeyboardInterrupt):
                _error_line("interrupted (files written so far are complete; rerun the command to resume where "
                            "it supports resuming)")
                raise typer.Exit(130) from None
            _error_line(_message(err))
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="Compare sparse-coding inference methods on a shared dictionary.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench_app, name="bench")
# Tables are wide: when the output is not a terminal (a file, CI), do not wrap them at 80 columns.
console = Console(width=None if Console().is_terminal else 200)
#: Columns shown on screen, headed by their names in the saved file (which has every column).
SHOWN = ("encoder", "cells", "tokens", "ce_clean", "ce_spliced", "ce_zero", "ce_increase", "ce_recovered", "dense_50",
         "dense_10", "k", "lam", "fvu", "l0", "f1", "exact_support", "nmse_db", "code_mcc", "dictionary_mcc",
         "objective_gap", "dead", "signals_per_s", "flops_per_signal", "ratio", "ratio_to_floor", "peak_memory_mb",
         "n_atoms", "variant", "precision", "reference", "fit_s")
#: tokens of a store an encoder named to `evaluate` is trained on
EVALUATE_TRAIN_TOKENS = 8192
#: what a help text says for an option whose default is "none given"
SYNTHETIC = "synthetic data"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def _join(device: str) -> tuple[distributed.Group, str]:
    """Join the launcher's process group when torchrun (or SLURM, ...) started this command as one
    of several, and return the group and this rank's device. Only rank 0 prints and writes shared
    files; the other ranks log warnings and errors (with their rank) on stderr. Alone, this is a
    group of one on `device`."""
    if not distributed.launched():
        return distributed.Group(), device
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        group = distributed.setup(device)
    except RuntimeError as err:         # a launch without torchrun's variables, an unreachable rank 0
        raise ValueError(f"could not join the job: {err}") from err
    atexit.register(distributed.teardown)
    if not group.main:
        console.quiet = True
        logging.basicConfig(level=logging.WARNING, format=f"rank {group.rank}: %(message)s", force=True)
    return group, str(distributed.rank_device(device))


@app.callback()
def _options(ctx: typer.Context,
             debug: bool = typer.Option(False, "--debug", envvar="SPARSECODE_DEBUG",
                                        help="Show the full traceback of an error instead of one line.")) -> None:
    """Compare sparse-coding inference methods on a shared dictionary."""
    ctx.meta[DEBUG_KEY] = debug


def print_table(rows: list[dict], columns: list[str], title: str = "", saved_in: str = "") -> None:
    """A table of the columns that fit the terminal (by `table.PRIORITY`); the others are named under it."""
    from .table import fit_columns, format_value
    columns, left_out = fit_columns(rows, columns, console.width if console.is_terminal else None)
    table = Table(title=title, header_style="bold")
    for col in columns:
        table.add_column(col, justify="left" if col in ("encoder", "reference") else "right")
    for row in rows:
        table.add_row(*(format_value(row.get(col)) for col in columns))
    console.print(table)
    if left_out:
        where = saved_in or "--out FILE.json or .csv"
        console.print(f"not shown at this width: {', '.join(left_out)} (all columns: {where})")


def _names(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"]."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _literal(text: str):
    """Value of an option whose type no config declares (reference learning methods)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _parse_option(name: str, item: str, fld: str, value: str):
    if name in REFERENCE_METHODS:
        return _literal(value)
    config = encoder_class(name).Config
    if fld not in config.__dataclass_fields__:
        raise ValueError(f"--set {item!r}: {name} has no option {fld!r}.{suggest(fld, config.__dataclass_fields__)}")
    return coerce_field(config, fld, value)


def _parse_sets(sets: list[str], names: list[str]) -> dict[str, dict]:
    """`--set fista.lam=0.05` -> {"fista": {"lam": 0.05}}, typed by the encoder's config. A command
    about one method or encoder also takes the older `--set FIELD=VALUE`."""
    params: dict[str, dict] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        name, dot, fld = key.rpartition(".")
        if not dot and len(names) == 1:
            name, dot = names[0], "."
        if not sep or not dot:
            raise ValueError(f"--set takes ENCODER.FIELD=VALUE, got {item!r}")
        if name not in names:
            raise ValueError(f"--set {item!r}: {name!r} is not among --encoders ({', '.join(names)})")
        params.setdefault(name, {})[fld] = _parse_option(name, item, fld, value)
    return params


def _progress(*columns) -> Progress:
    """A transient progress display: spinner, description, bar, then `columns`, then the time elapsed
    and the time left."""
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), *columns, TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


@contextlib.contextmanager
def _progress_bars(total: int, label: str, tokens: list | None = None):
    """A bar over the items (encoders, methods) and one over the training steps of the current item.

    When `tokens` is a list, the function appended to it is `compare`'s progress callback: a bar
    over the tokens of a streamed store, with tokens/s and the time left.
    """
    with _progress(TextColumn("{task.completed:,}/{task.total:,}"), TextColumn("{task.fields[loss]}")) as progress:
        items = progress.add_task(label, total=total, loss="")
        steps = {}
        streamed = {}

        def on_tokens(name: str, done: int, n_total: int) -> None:
            if name not in streamed:
                for old in streamed.values():
                    progress.remove_task(old[0])
                streamed.clear()
                streamed[name] = (progress.add_task(f"{name}: tokens", total=n_total, loss=""), time.perf_counter())
            task, t0 = streamed[name]
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=done, loss=f"{rate:,.0f} tokens/s")

        if tokens is not None:
            tokens.append(on_tokens)

        def on_item(name: str, event: str) -> None:
            if event == "start":
                progress.update(items, description=f"{label}: {name}")
            else:
                progress.advance(items)

        def on_step(what: str, step: int, n_steps: int, loss: float) -> None:
            if what not in steps:
                for old in steps.values():
                    progress.remove_task(old)
                steps.clear()
                steps[what] = progress.add_task(what, total=n_steps, loss="")
            # steps without a loss (a reference solve) show none
            progress.update(steps[what], completed=step, loss="" if math.isnan(loss) else f"loss {loss:.4g}")

        with training.progress(on_step):
            yield on_item


def _saved(path) -> None:
    console.print(f"saved {path}")


def _renamed(old: str, new: str, value, current):
    """The value of a former option name when it was given (with a note), else the current one's."""
    if value is None:
        return current
    console.print(f"[yellow]{old} is now {new}[/]")
    return value


#: the options every trained encoder shares (steps, batch_size, ...): listed once, not per encoder
TRAINING = {f.name: None for f in dataclasses.fields(training.TrainConfig)}.keys()


def _si(value: float) -> str:
    """A count in three significant figures with an SI suffix (4.72M); '-' for NaN."""
    if math.isnan(value):
        return "-"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


@app.command("list")
def list_encoders() -> None:
    """Show every registered encoder by family (its sparsity knob, its cost per signal, its other
    options, whether it can run here) and every dictionary learning method (`train --method`,
    `compare --joint`) with its options."""
    infos = available_encoders()
    size = COST_SIZE
    console.print(f"[bold]sparsecode encoders[/], by family. cost: analytic FLOPs to encode one signal on a "
                  f"random {size['n_atoms']:,} x {size['d']} dictionary, k={size['k']} where the method has a k, "
                  "other knobs at their defaults (iterative solvers: at their iteration cap; '-': no closed "
                  "form).", width=min(console.width, 100))
    families = sorted({info.family for info in infos}, key=lambda f: (f == "?", f))
    for family in families:
        table = Table(title=f"{family if family != '?' else 'failed to load'}", title_justify="left",
                      header_style="bold", show_lines=True)
        table.add_column("encoder", max_width=16)
        table.add_column("knob (default): meaning", max_width=36)
        table.add_column("cost", justify="right", max_width=8)
        table.add_column("other options (default)", max_width=24)
        for info in (i for i in infos if i.family == family):
            name = info.name
            if not info.available:
                name += (f"\n[red]needs[/] pip install {' '.join(info.missing)}" if info.missing
                         else f"\n[red]broken[/]: {info.error}")
            knob = "-"
            if info.knob in info.knobs:
                default, meaning = info.knobs[info.knob]
                knob = f"[bold]{info.knob}[/] ({default!r}): {meaning}"
            trained = TRAINING <= info.knobs.keys()
            others = ", ".join(f"{k}={v[0]!r}" for k, v in info.knobs.items()
                               if k != info.knob and not (trained and k in TRAINING))
            others = ("training options" + (f" + {others}" if others else "")) if trained else others or "-"
            table.add_row(name, knob, _si(info.flops), others)
        console.print(table, width=min(console.width, 100))
    console.print(f"training options (every trained encoder and learning method): {', '.join(TRAINING)}. Set any "
                  "option with `compare --set ENCODER.OPTION=VALUE`.", width=min(console.width, 100))
    compiled = [info.name for info in infos if "kernel" in info.knobs]
    if compiled:
        state = ("built here" if native.available() else
                 f"[yellow]not available here[/] ({native.why_unavailable()}): they run as torch operations")
        console.print(f"compiled CPU kernels (the kernel option of {', '.join(compiled)}): {state}.",
                      width=min(console.width, 100))
    methods = Table(title="dictionary learning methods", header_style="bold")
    methods.add_column("method")
    methods.add_column("learns")
    methods.add_column("options", max_width=44)
    for method in learning_methods():
        what = "dictionary; codes by inference" if method in REFERENCE_METHODS else "encoder and dictionary together"
        options = method_options(method)
        if TRAINING <= set(options):
            own = ", ".join(o for o in options if o not in TRAINING)
            methods.add_row(method, what, "training options" + (f" + {own}" if own else ""))
        else:
            methods.add_row(method, what, ", ".join(options))
    console.print(methods, width=min(console.width, 100))


@app.command("compare")
def compare_cmd(
    encoders: str = typer.Option("fista,omp", help="Comma-separated encoder names (see `sparsecode list`)."),
    data: Optional[Path] = typer.Option(None, show_default=SYNTHETIC,
                                        help="A .safetensors file with 'x' (n, d) and optionally 'codes' (n, "
                                             "n_atoms), or activations:STORE (--n-train tokens to train on, then "
                                             "--n-samples to compare on)."),
    dictionary: str = typer.Option(TRUE_DICTIONARY,
                                   help="'true' (the synthetic data's own), a saved dictionary path, or an SAE folder "
                                        "(SAELens, sparsify, dictionary_learning: its decoder). Without --data, "
                                        "synthetic signals are planted in this dictionary (its n_atoms and d; --k "
                                        "non-zeros per code)."),
    n_samples: int = typer.Option(1024, help="Signals to compare on: synthetic ones, or tokens of an activation "
                                             "store, one signal each (streamed shard by shard; more than the store "
                                             "holds: all after --n-train)."),
    d: Optional[int] = typer.Option(None, show_default="8, or the --dictionary's",
                                    help="Signal dimension of synthetic data."),
    n_atoms: Optional[int] = typer.Option(None, show_default="16, or the --dictionary's",
                                          help="Atoms of the synthetic dictionary (with --joint: of every learned "
                                               "one too)."),
    k: Optional[int] = typer.Option(None, show_default="3 for synthetic data, else each encoder's own",
                                    help="Non-zeros per synthetic code; also the k of every encoder with a k."),
    noise: float = typer.Option(0.0, help="Standard deviation of Gaussian noise added to synthetic signals."),
    snr_db: Optional[float] = typer.Option(None, show_default="no noise, or --noise",
                                           help="Noise level as signal-to-noise ratio in dB instead of --noise."),
    firing: str = typer.Option("uniform", help="Synthetic support: 'uniform' or 'power-law'."),
    signed: bool = typer.Option(False, help="Synthetic code values N(0,1) instead of |N(0,1)|."),
    data_seed: int = typer.Option(0, help="Seed of the synthetic data."),
    seed: int = typer.Option(0, help="Seed of training runs (trained encoders, dictionary learning)."),
    train_seed: Optional[int] = typer.Option(None, hidden=True, help="Former name of --seed."),
    lam: Optional[float] = typer.Option(None, show_default="0.1 x the median lam_max of the signals",
                                        help="Lasso penalty 0.5||x - zD||^2 + lam||z||_1 for every encoder that has "
                                             "lam (lam_max: the penalty that zeroes a signal's code)."),
    set_: list[str] = typer.Option([], "--set", show_default="none",
                                   help="Per-encoder option, ENCODER.FIELD=VALUE (repeatable)."),
    target_l0: Optional[float] = typer.Option(None, show_default="off",
                                              help="Calibrate every encoder's knob (k or lam) to this mean L0."),
    n_train: int = typer.Option(1024, help="Training signals (synthetic: same dictionary, other codes; a store: its "
                                          "first tokens) for trained encoders and, with --joint, for dictionary "
                                          "learning."),
    train_data: Optional[Path] = typer.Option(None, show_default="none",
                                              help="A .safetensors file (or activations:STORE) with training "
                                                   "signals 'x' (with --data)."),
    joint: bool = typer.Option(False, help="Each method learns its own dictionary (--encoders are learning methods: "
                                           "see `sparsecode list`)."),
    allow_pickle: bool = typer.Option(False, help="Allow reading a pickle SAE weights file (dictionary_learning's "
                                                  "ae.pt), with torch.load(weights_only=True)."),
    reference: str = typer.Option("auto", help="Lasso solver whose optimum is the reference of the objective gap "
                                               "(rows of encoders that solve the lasso): an encoder name, 'none', or "
                                               "'auto' (fista, only when a lasso encoder is compared and n_atoms * "
                                               "n_samples is small)."),
    repeats: int = typer.Option(1, help="Encode this many times; the median time is reported."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N, or auto (cuda when available)."),
    out: Optional[Path] = typer.Option(None, show_default="not saved", help="Save results to this .json or .csv file."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """Run several encoders on one shared dictionary (or, with --joint, several dictionary learners)
    and print their metrics."""
    _setup_logging(verbose)
    group, device = _join(device)
    if out is not None:
        Comparison.check_out(out)
    check_int_range("--n-samples", n_samples, 1)
    seed = _renamed("--train-seed", "--seed", train_seed, seed)
    names = _names(encoders)
    if not joint:
        for name in names:
            if not name.endswith(".safetensors"):
                encoder_class(name)
    params = _parse_sets(set_, names)
    shared = load_dictionary(dictionary, allow_pickle)
    if data is not None:
        if shared is None and not joint:
            raise ValueError("--data needs --dictionary PATH (a file's signals have no 'true' dictionary)")
        source, x_train = comparison_data(data, n_samples, n_train, train_data)
    else:
        # Signals are planted in the dictionary the encoders use, so the codes are the truth for it.
        source, x_train = planted_split(n_samples, n_train, d=d, n_atoms=n_atoms, k=3 if k is None else k,
                                       dictionary=None if joint else shared, noise=noise, snr_db=snr_db,
                                       firing=firing, positive=not signed, seed=data_seed)
    on_tokens: list = []
    with _progress_bars(len(names), "methods" if joint else "encoders", on_tokens) as on_item:
        result = run_compare(names, source, None if joint else shared, k=k, lam=lam, encoder_params=params,
                             target_l0=target_l0, x_train=x_train, joint=joint,
                             n_atoms=n_atoms if joint else None, seed=seed, repeats=repeats,
                             reference=None if joint else reference, device=device, callback=on_item,
                             progress=on_tokens[0])
    s = result.settings
    if data is None:
        s["data_seed"] = data_seed
    where = ""
    if data is None and shared is not None and not joint:
        where = f" planted in {dictionary} ({3 if k is None else k} non-zeros per code: the codes are the truth for it)"
        s["data"] = f"synthetic, planted in {dictionary}"
    note = result.knobs_note()
    print_table(result.rows, [c for c in result.columns() if c in SHOWN],
                title=f"{s['n_samples']} signals{where}, d={s['d']}, n_atoms={s['n_atoms']}"
                      + (" (joint: each method learns its dictionary)" if joint else f", device={s['device']}")
                      + (f"; {note}" if note else ""), saved_in=str(out) if out is not None else "")
    for row in result.rows:
        if "skipped" in row:
            console.print(f"[yellow]skipped[/] {row['encoder']}: {row['skipped']}")
    if out is not None and group.main:
        result.save(out)
        _saved(out)


@app.command("train")
def train_cmd(
    method: str = typer.Option("topk", help="Dictionary learning method (see `sparsecode list`)."),
    n_atoms: int = typer.Option(..., help="Atoms to learn (and of the synthetic data's true dictionary)."),
    out: Path = typer.Option(..., help="Where to save: OUT.safetensors/.json (dictionary) and, for trained "
                                       "encoders, OUT-encoder.safetensors/.json."),
    data: Optional[Path] = typer.Option(None, show_default=SYNTHETIC,
                                        help="A .safetensors file with signals 'x' (and 'y', targets of a "
                                             "transcoder), or activations:STORE."),
    n_samples: int = typer.Option(1024, help="Signals to train on: synthetic ones, or tokens of an activation "
                                             "store, one signal each (streamed shard by shard by the trainable "
                                             "methods)."),
    d: int = typer.Option(8, help="Signal dimension of synthetic data."),
    k: Optional[int] = typer.Option(None, show_default="3 for synthetic data, else the method's own",
                                    help="Non-zeros per synthetic code; also the k of a method with a k."),
    true_atoms: Optional[int] = typer.Option(None, hidden=True,
                                             help="Atoms of the synthetic data's true dictionary when they differ "
                                                  "from --n-atoms."),
    noise: float = typer.Option(0.0, help="Standard deviation of Gaussian noise added to synthetic signals."),
    data_seed: int = typer.Option(0, help="Seed of the synthetic data."),
    seed: int = typer.Option(0, help="Seed of training (initialisation and data order)."),
    set_: list[str] = typer.Option([], "--set", show_default="none",
                                   help="Method option METHOD.FIELD=VALUE, e.g. --set topk.steps=5000 (repeatable)."),
    checkpoint_every: Optional[int] = typer.Option(
        None, show_default="every 10 minutes",
        help="Steps (sparse-coding: iterations) between checkpoints in OUT-checkpoint.safetensors/.json. "
             "Running the same command again resumes from it; it is removed when training ends."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """Learn a dictionary (and its encoder) from signals and save them."""
    _setup_logging(verbose)
    group, _ = _join("auto")
    encoder_out = _io.sibling(out, "-encoder")
    _io.check_pair(out, DICTIONARY_FORMAT, "sparsecode dictionary")
    _io.check_pair(encoder_out, encoder_file.ENCODER_FORMAT, "sparsecode encoder")
    options = method_options(method)
    params = _parse_sets(set_, [method]).get(method, {})
    if k is not None and "k" in options:
        params.setdefault("k", k)
    if checkpoint_every is not None:
        if "checkpoint_every" not in options:
            raise ValueError(f"method {method!r} cannot checkpoint (--checkpoint-every): it runs in another library")
        params["checkpoint_every"] = checkpoint_every
    train = training_data(data, n_samples, streams=method not in REFERENCE_METHODS, d=d,
                          n_atoms=true_atoms or n_atoms, k=3 if k is None else k, noise=noise, seed=data_seed)
    with _progress_bars(1, "train") as on_item, checkpoints(_io.sibling(out, "-checkpoint")):
        on_item(method, "start")
        learned = learn_dictionary(train.source, method, n_atoms, y=train.y, seed=seed,
                                   input_scale=train.input_scale, **params)
        on_item(method, "done")
    if group.main:
        console.print(f"saved dictionary {learned.dictionary.save(out)}")
        if isinstance(learned.encoder, training.TrainableEncoder):
            console.print(f"saved encoder {learned.encoder.save(encoder_out)}")
    row = {"encoder": method, **train.scores(learned.dictionary, learned.encoder)}
    print_table([row], list(row), title="on the training signals")


@app.command("extract")
def extract_cmd(
    out: Path = typer.Option(..., help="Store folder (manifest.json + shards); an existing store is resumed."),
    model: Optional[str] = typer.Option(None, show_default="the embedded SmolLM2-135M-Instruct",
                                        help="Hugging Face hub id or local model folder."),
    corpus: Optional[str] = typer.Option(None, show_default="the Python documentation that ships with Python",
                                         help="A .txt file, a .jsonl file, or a Hugging Face dataset name."),
    text_field: str = typer.Option("text", help="Field holding the text in a JSONL corpus."),
    layer: int = typer.Option(15, help="Block index (0-based; negative counts from the end)."),
    site: str = typer.Option("resid", help="'resid' (residual stream after the block) or 'mlp' (MLP input and "
                                           "output, for transcoders)."),
    context_length: int = typer.Option(128, help="Tokens per sequence."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    n_tokens: int = typer.Option(20_000, help="Token budget."),
    shard_tokens: int = typer.Option(8192, help="Tokens per shard."),
    skip_bos: bool = typer.Option(True, help="Start sequences with BOS and store no activation for it."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32, float16, bfloat16."),
    data_seed: int = typer.Option(0, help="Seed of the order of the corpus's sequences (the manifest's 'seed')."),
    seed: Optional[int] = typer.Option(None, hidden=True, help="Former name of --data-seed."),
    normalize: bool = typer.Option(True, help="Record the scale to unit mean squared norm in the manifest "
                                              "(readers apply it on request)."),
    measure_overhead: bool = typer.Option(False, help="Also time a bare forward pass over the same tokens."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """Extract LLM activations at a hookpoint into a resumable sharded store."""
    _setup_logging(verbose)
    group, device = _join(device)
    _io.check_writable(out, "--out", folder=True)
    cfg = ExtractConfig(layer=layer, site=site, context_length=context_length, batch_size=batch_size,
                        n_tokens=n_tokens, shard_tokens=shard_tokens, skip_bos=skip_bos, dtype=dtype,
                        seed=_renamed("--seed", "--data-seed", seed, data_seed))
    corpus_name, docs = read_corpus(corpus, text_field)
    console.print(f"loading {model or 'the embedded SmolLM2-135M-Instruct'}...")
    loaded = load_model(model, device=device)
    with _progress(TextColumn("{task.completed:,}/{task.total:,} tokens"), TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task("extracting", total=n_tokens, rate="")
        t0 = time.perf_counter()

        def on_tokens(done: int, total: int) -> None:
            elapsed = time.perf_counter() - t0
            bar.update(task, completed=min(done, total), rate=f"{done / max(elapsed, 1e-9):,.0f} tok/s")

        stats = extract(loaded, corpus_name, docs, out, cfg, progress=on_tokens, measure_overhead=measure_overhead)
    if normalize and group.main:
        compute_normalization(out)
    line = (f"stored {stats.tokens:,} tokens ({stats.resumed_from:,} were there already) in {out} at "
            f"{stats.tokens_per_s:,.0f} tokens/s")
    if stats.overhead is not None:
        line += f"; bare forward {stats.bare_tokens_per_s:,.0f} tokens/s, overhead {stats.overhead:+.1%}"
    console.print(line)


#: marker of a saved `evaluate` result
EVALUATION_FORMAT = "sparsecode.evaluation"


@app.command("evaluate")
def evaluate_cmd(
    dictionary: str = typer.Option(..., help="A saved dictionary or SAE folder."),
    encoder: str = typer.Option(..., help="An encoder name (fitted to the dictionary; trained ones need --store) or "
                                          "a saved trained encoder (.safetensors)."),
    store: Optional[Path] = typer.Option(None, show_default="none",
                                         help="Activation store the dictionary belongs to: gives model, layer, site "
                                              "and normalisation, and training data."),
    model: Optional[str] = typer.Option(None, show_default="the store's, else the embedded SmolLM2",
                                        help="Hugging Face hub id or local model folder."),
    layer: Optional[int] = typer.Option(None, show_default="the store's, else 15", help="Block index."),
    site: Optional[str] = typer.Option(None, show_default="the store's, else resid", help="resid or mlp."),
    corpus: Optional[str] = typer.Option(None, show_default="the Python documentation", help="Held-out text."),
    n_tokens: int = typer.Option(4096, help="Tokens to evaluate on."),
    context_length: int = typer.Option(128, help="Tokens per sequence."),
    set_: list[str] = typer.Option([], "--set", show_default="none", help="Encoder option ENCODER.FIELD=VALUE."),
    histogram: Optional[Path] = typer.Option(None, show_default="not drawn",
                                             help="Save the firing-rate histogram here (.png)."),
    out: Optional[Path] = typer.Option(None, show_default="not saved", help="Save the results (.json)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
) -> None:
    """Splice reconstructions into the model: CE increase, CE recovered, firing rates."""
    if out is not None:
        _io.check_replace(_io.check_writable(out, "--out", suffixes=(".json",)), "sparsecode evaluation",
                          lambda p: _io.has_format(p, EVALUATION_FORMAT))
    if histogram is not None:
        _io.check_replace(_io.check_writable(histogram, "--histogram", suffixes=(".png",)), "PNG figure",
                          lambda p: p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    activations = ActivationStore(store) if store is not None else None
    D = as_dictionary(dictionary)
    if encoder.endswith(".safetensors"):
        enc = encoder_file.load_encoder(encoder)
    else:
        enc = get_encoder(encoder, **_parse_sets(set_, [encoder]).get(encoder, {}))
        if enc.trainable and activations is None:
            raise ValueError(f"encoder {encoder!r} is trained: give --store to train it on")
        enc.fit(D, activations.load(EVALUATE_TRAIN_TOKENS, normalize=True).x if enc.trainable else None)
    at = Hookpoint.of(D, activations, model=model, layer=layer, site=site)
    loaded = load_model(at.model, device=device)
    _, docs = read_corpus(corpus)
    result = evaluate(loaded, enc, D, docs, layer=at.layer, site=at.site, context_length=context_length,
                      n_tokens=n_tokens, scale=at.scale, seed=at.seed)
    shown = result.metrics()
    print_table([{"encoder": enc.name, **shown}], ["encoder", *shown],
                title=f"spliced into the model at layer {at.layer} ({at.site})")
    if histogram is not None:
        _saved(firing_histogram(result.firing_rates, histogram, title=enc.name))
    if out is not None:
        _io.write_json(out, {"format": EVALUATION_FORMAT, **result.to_dict()})
        _saved(out)


@app.command("export")
def export_cmd(
    encoder: str = typer.Option(..., help="A trained encoder (.safetensors written by `train` or `save`) or an SAE "
                                          "folder to convert."),
    out: Path = typer.Option(..., help="Folder to write cfg.json + sae_weights.safetensors into (SAELens layout)."),
    allow_pickle: bool = typer.Option(False, help="Allow reading a pickle SAE weights file (ae.pt)."),
) -> None:
    """Export a ReLU/TopK SAE encoder and its dictionary in SAELens's format."""
    check_export_folder(out)
    if Path(encoder).is_dir():
        enc = get_encoder("sae-file", allow_pickle=allow_pickle).fit(load_sae_dictionary(encoder, allow_pickle))
    else:
        enc = encoder_file.load_encoder(encoder)
    folder = export_saelens(enc, out)
    console.print(f"saved SAELens folder {folder}")


@bench_app.command("speed")
def bench_speed(
    n_samples: int = typer.Option(4096, help="Signals encoded."),
    d: int = typer.Option(256, help="Signal dimension."),
    n_atoms: int = typer.Option(1024, help="Dictionary atoms."),
    k: int = typer.Option(16, help="Non-zeros per code, and the k of the OMPs."),
    lam: float = typer.Option(0.05, help="Lasso penalty of the lasso solvers."),
    repeats: int = typer.Option(5, help="Timed runs per encoder; medians are reported."),
    threads: int = typer.Option(0, help="Threads for torch and SPAMS (0: leave as is)."),
    device: str = typer.Option("cpu", help="Device of our encoders."),
    out: Optional[Path] = typer.Option(None, show_default="not saved", help="Save the rows to .json or .csv."),
) -> None:
    """Throughput of our OMP and FISTA against SPAMS and scikit-learn on one problem, as ratios."""
    _setup_logging(False)
    if out is not None:
        Comparison.check_out(out)
    rows = speed(n_samples=n_samples, d=d, n_atoms=n_atoms, k=k, lam=lam, repeats=repeats, threads=threads,
                 device=device, callback=lambda name: console.print(f"[dim]timing {name}...[/]"))
    print_table(rows, ["encoder", "reference", "signals_per_s", "ratio", "f1", "l0", "objective_gap"],
                title=f"speed: {n_samples} signals, d={d}, n_atoms={n_atoms}, k={k}, lam={lam}")
    if out is not None:
        Comparison(rows, {"bench": "speed"}).save(out)
        _saved(out)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    """`--n-atoms 4096,16384` -> (4096, 16384)."""
    try:
        values = tuple(int(v.replace("_", "")) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} takes whole numbers separated by commas, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} needs at least one value, got {text!r}")
    return values


@bench_app.command("ranks")
def bench_ranks(
    ranks: int = typer.Option(2, help="Processes of the many-process run (torchrun --nproc-per-node)."),
    n_tokens: int = typer.Option(32768, help="Signals of the synthetic activation store compared on."),
    d: int = typer.Option(256, help="Signal dimension."),
    n_atoms: int = typer.Option(1024, help="Atoms of the dictionary."),
    k: int = typer.Option(16, help="Non-zeros per synthetic code and the encoders' k."),
    encoders: str = typer.Option("omp,fista", help="Comma-separated encoders."),
    repeats: int = typer.Option(1, help="Runs of each command; medians are reported."),
    train: str = typer.Option("topk", help="Comma-separated methods whose data-parallel training is timed too "
                                           "('' for none)."),
    train_steps: int = typer.Option(20, help="Training steps of each timed training."),
    train_batch: int = typer.Option(4096, help="Signals per training step (the global batch)."),
    out: Optional[Path] = typer.Option(None, show_default="not saved", help="Save the rows to this JSON file."),
) -> None:
    """Speed-up of a comparison over an activation store, and of training on it, on --ranks processes
    (torchrun, one thread each) over one process."""
    _setup_logging(False)
    if out is not None:
        _io.check_writable(out, "--out", suffixes=(".json",))
    methods = tuple(_names(train)) if train.strip() else ()
    with _progress(TextColumn("{task.completed}/{task.total} runs")) as bar:
        task = bar.add_task("ranks", total=2 * repeats * (1 + len(methods)))
        rows = bench_ranks_run(n_ranks=ranks, n_tokens=n_tokens, d=d, n_atoms=n_atoms, k=k,
                               encoders=tuple(_names(encoders)), repeats=repeats, train=methods,
                               train_steps=train_steps, train_batch=train_batch,
                               callback=lambda done, total: bar.update(task, completed=done))
    print_table(rows, ["work", "encoder", "ranks", "signals_per_s_1", "signals_per_s", "speedup", "wall_s_1",
                       "wall_s", "wall_speedup"],
                title=f"{ranks} processes over 1, one thread each: {n_tokens:,} signals, d={d}, n_atoms={n_atoms}, "
                      f"k={k} (signals/s: encoding, or training; wall: the whole command)")
    if out is not None:
        _io.write_json(out, {"bench": "ranks", "rows": rows})
        _saved(out)


@bench_app.command("scale")
def bench_scale(
    n_atoms: str = typer.Option("4096,16384,65536", help="Dictionary sizes, comma-separated."),
    d: str = typer.Option("576", help="Signal dimensions, comma-separated (the full grid: 576,2304)."),
    k: str = typer.Option("32", help="Non-zeros per code and the encoders' k, comma-separated (full grid: 32,64)."),
    n_samples: int = typer.Option(256, help="Signals per cell at n_atoms=4,096, d=576; larger cells get proportionally "
                                            "fewer (at least 32)."),
    repeats: int = typer.Option(3, help="Timed runs per encoder; medians are reported."),
    memory: Optional[str] = typer.Option(None, show_default="half the device's free memory",
                                         help="Working-memory budget of every encoder, e.g. 4GB."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    encoders: str = typer.Option("omp,mp,fista,topk,spams-omp", help="Comma-separated encoders."),
    set_: list[str] = typer.Option([], "--set", show_default="none",
                                   help="Encoder option ENCODER.FIELD=VALUE, e.g. --set omp.variant=gram (repeatable)."),
    out: Optional[Path] = typer.Option(None, show_default="not saved", help="Save the rows to this JSON file."),
    figure: Optional[Path] = typer.Option(None, show_default="not drawn", help="Save a figure of throughput against n_atoms (.png, .pdf, .svg)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """Inference at the sizes of real SAEs: throughput, peak memory and time relative to the amortised floor."""
    _setup_logging(verbose)
    grid = {"n_atoms": _int_list(n_atoms, "--n-atoms"), "d": _int_list(d, "--d"), "k": _int_list(k, "--k")}
    names = _names(encoders)
    params = _parse_sets(set_, names)
    with _progress(TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn()) as bar:
        task = bar.add_task("scale", total=None)
        rows = scale(**grid, n_samples=n_samples, repeats=repeats, memory=memory, device=device,
                     encoders=tuple(names), encoder_params=params,
                     callback=lambda done, total, what: bar.update(task, completed=done, total=total, description=what))
    label = describe_device(device)
    print_table([r for r in rows if "skipped" not in r],
                ["n_atoms", "d", "k", "encoder", "variant", "kernel", "precision", "signals_per_s", "ratio_to_floor",
                 "peak_memory_mb", "f1", "l0"], title=f"scale: {label}, float32 (ratio: time / amortised floor's time)")
    for row in rows:
        if "skipped" in row:
            console.print(f"[yellow]skipped[/] {row['encoder']} at n_atoms={row['n_atoms']}, d={row['d']}, "
                          f"k={row['k']}: {row['skipped']}")
    if out is not None:
        _io.write_json(out, {"bench": "scale", "device": label, "dtype": "float32", "memory": memory,
                             "encoder_params": params, "rows": rows})
        _saved(out)
    if figure is not None:
        scale_figure(rows, figure, title=f"Inference throughput ({label}, float32)")
        _saved(figure)


def _grid(items: list[str]) -> dict:
    """`--grid n_atoms=16,32` -> {"n_atoms": [16, 32]}."""
    grid = {}
    for item in items:
        axis, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid takes AXIS=V1,V2,..., got {item!r}")
        grid[axis] = [_literal(v) for v in values.split(",")]
    return grid


@bench_app.command("recovery")
def bench_recovery(
    preset: str = typer.Option("paper-c", help="paper-c, compressed-sensing or sae-realistic."),
    out: Optional[Path] = typer.Option(None, show_default="recovery-PRESET.jsonl",
                                       help="Results, one JSON line per cell after a settings header; an existing "
                                            "results file is resumed (finished cells are skipped), one with other "
                                            "settings is refused."),
    encoders: Optional[str] = typer.Option(None, show_default="the preset's", help="Comma-separated encoders."),
    grid: list[str] = typer.Option([], show_default="the preset's", help="Replace a grid axis: AXIS=V1,V2 (axes: n_atoms, d, k, snr_db, "
                                            "coherence, power_law). Repeatable."),
    seeds: Optional[int] = typer.Option(None, show_default="the preset's", help="Seeds per grid point (>= 1)."),
    n_samples: Optional[int] = typer.Option(None, show_default="the preset's", help="Test signals per cell."),
    match: str = typer.Option("l0", help="'l0': every encoder at the planted k (k set, lam calibrated); 'none'."),
    budget: Optional[int] = typer.Option(None, show_default="each encoder's own", help="Iterations per signal for iterative encoders (matched compute)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step."),
) -> None:
    """Sweep planted problems over a grid and record how each encoder recovers the codes."""
    _setup_logging(verbose)
    out = out or default_out(preset)
    _io.check_writable(out, "--out")
    names = None if encoders is None else _names(encoders)
    axes = _grid(grid)
    get_preset(preset)
    with _progress(TextColumn("{task.completed}/{task.total}")) as bar:
        task = bar.add_task(f"{preset} cells", total=None)

        def on_cell(done: int, total: int, record: dict) -> None:
            bar.update(task, completed=done, total=total,
                       description=f"{preset} cells ({', '.join(f'{k}={v}' for k, v in record['cell'].items())})")

        records = recovery(preset, out=out, encoders=names, grid=axes, seeds=seeds, n_samples=n_samples,
                           match=match, budget=budget, device=device, callback=on_cell)
    from .report import flat_rows, ranking
    rows = ranking(flat_rows(records))
    print_table(rows, ["encoder", "cells", "code_mcc", "f1", "exact_support", "fvu", "l0", "flops_per_signal"],
                title=f"{preset}: {len(records)} cells, means")
    skipped = [(r["encoder"], r["skipped"]) for rec in records for r in rec.get("rows", []) if "skipped" in r]
    for name, why in dict(skipped).items():
        console.print(f"[yellow]skipped[/] {name} in some cells: {why}")
    console.print(f"results in {out}; figures: sparsecode report {out}")


@app.command("report")
def report_cmd(
    results: Path = typer.Argument(..., help="A results file from `sparsecode bench recovery`."),
    out: Optional[Path] = typer.Option(None, show_default="RESULTS without .jsonl, plus -report",
                                       help="Folder for the figures and report.md."),
) -> None:
    """Render phase-transition maps, MCC-vs-N curves, Pareto fronts and a ranking table."""
    from .report import report
    folder = out or _io.sibling(results, "-report", suffixes=(".jsonl",))
    _io.check_writable(folder, "--out", folder=True)
    summary = report(results, folder)
    console.print(f"wrote {summary} and {len(list(folder.glob('*.png')))} figures in {folder}")


@app.command("synth")
def synth_cmd(
    out: Path = typer.Option(..., help="The signals file to write (.safetensors): tensors 'x' (n_samples, d) and "
                                       "'codes' (n_samples, n_atoms), the input of `compare --data`."),
    dictionary_out: Optional[Path] = typer.Option(None, help="Where to save the planted dictionary (a pair "
                                                             "STEM.safetensors + STEM.json, the input of `compare "
                                                             "--dictionary`); by default beside OUT, named after it: signals.safetensors -> "
                                                             "signals-dictionary.safetensors."),
    n_samples: int = typer.Option(1024, help="Signals drawn."),
    d: int = typer.Option(8, help="Signal dimension."),
    n_atoms: int = typer.Option(16, help="Atoms of the planted dictionary."),
    k: int = typer.Option(3, help="Non-zeros per code."),
    noise: float = typer.Option(0.0, help="Standard deviation of Gaussian noise added to the signals."),
    data_seed: int = typer.Option(0, help="Seed of the synthetic data: dictionary, codes and noise."),
) -> None:
    """Write a planted sparse-coding problem (paper c's generator, as `compare` draws it) to files:
    signals with their true codes, and the dictionary beside them."""
    _io.check_writable(out, "--out", suffixes=(".safetensors",))
    _io.check_replace(out, "synthetic signals file (tensors x and codes)",
                      lambda p: set(_io.read_tensors(p, "signals")) == {"x", "codes"})
    dict_stem = dictionary_out or _io.sibling(out, "-dictionary")
    _io.check_pair(dict_stem, DICTIONARY_FORMAT, "sparsecode dictionary")
    if _io.paired(dict_stem)[0].resolve() == Path(out).resolve():
        raise ValueError(f"--dictionary-out {dict_stem} would write over --out {out}; give another name")
    from .synthetic import make_sparse_data
    data = make_sparse_data(n_samples, d, n_atoms, k, noise=noise, seed=data_seed)
    _io.write_tensors(Path(out), {"x": data.x, "codes": data.codes})
    dict_path = data.dictionary.save(dict_stem)
    console.print(f"wrote {out} (x: {n_samples} x {d}, codes: {n_samples} x {n_atoms}, {k} non-zeros each) and "
                  f"the dictionary {dict_path} ({n_atoms} atoms)")
    console.print(f"next: sparsecode compare --data {out} --dictionary {dict_path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
