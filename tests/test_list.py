"""`sparsecode list`: encoders by family, each with its knob and its analytic cost per signal."""
import math

import torch
from typer.testing import CliRunner

import sparsecode as sc
from sparsecode.cli import app
from sparsecode.registry import COST_SIZE, available_encoders, encoder_class, planned_flops

runner = CliRunner()
N, D, K = COST_SIZE["n_atoms"], COST_SIZE["d"], COST_SIZE["k"]


def test_planned_flops_are_the_published_counts_at_the_stated_size():
    # TopK SAE: x W^T (2 d n), bias, top-k and ReLU (3 n)
    assert planned_flops(encoder_class("topk"), N, D, K) == 2 * D * N + 3 * N
    # OMP (Gram variant): x D^T; per step j before the last the support's j + 1 Gram rows into the
    # correlations (2 (j + 1) n) and the pick (2 n); the last pick (2 n); then a k x k solve
    omp = 2 * D * N + sum(2 * (j + 1) * N + 2 * N for j in range(K - 1)) + 2 * N + K * K
    assert planned_flops(encoder_class("omp"), N, D, K) == omp == 9_044_992
    # an imported SAE has no count before its file is read
    assert math.isnan(planned_flops(encoder_class("sae-file"), N, D, K))


def test_planned_flops_match_what_a_fitted_encoder_reports():
    g = torch.Generator().manual_seed(0)
    dictionary = sc.Dictionary(torch.randn(24, 10, generator=g), normalize=True)
    x = torch.randn(64, 10, generator=g)
    for name, fields in (("omp", {"k": 4}), ("admm", {}), ("alista", {"steps": 2}), ("topk", {"k": 4, "steps": 2}),
                         ("jumprelu", {"steps": 2}), ("mp-sae", {"k": 4, "steps": 2})):
        planned = sc.get_encoder(name, **fields).planned_flops(dictionary)
        enc = sc.get_encoder(name, **fields)
        enc.fit(dictionary, x) if enc.trainable else enc.fit(dictionary)
        assert planned == enc.flops_per_signal(), name
        assert not enc.trainable or enc.net is not None       # planning left the real encoder alone


def test_list_groups_by_family_with_knob_and_cost_within_100_columns():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    lines = result.output.split("dictionary learning methods")[0].splitlines()      # the encoder tables
    infos = {info.name: info for info in available_encoders()}
    titles = {line.strip() for line in lines}
    for family in {info.family for info in infos.values()}:
        assert family in titles, family
    rows = {line.split("│")[1].strip(): line for line in lines if line.startswith("│") and line.split("│")[1].strip()}
    assert "4.73M" in rows["topk"] and rows["topk"].split("│")[2].strip().startswith("k (16)")
    assert "9.04M" in rows["omp"]
    assert rows["jumprelu"].split("│")[2].strip().startswith("l0_coefficient (0.001)")
    assert rows["sae-file"].split("│")[3].strip() == "-"
    for name in ("admm", "cd", "lca", "gradient-pursuit", "jumprelu", "batch-topk", "matryoshka", "gated", "alista",
                 "mp-sae"):
        assert name in rows, name
    # each encoder sits in its own family's table: the nearest title above its row
    for name in ("gradient-pursuit", "lca", "alista", "gated"):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"│ {name} "))
        title = next(lines[i].strip() for i in range(at, -1, -1) if lines[i].strip() in infos[name].family)
        assert title == infos[name].family
