import numpy as np
import pytest
import torch

from sparsecode import metrics


def test_fvu_of_the_mean_is_one_and_of_the_truth_zero():
    x = torch.randn(50, 4, dtype=torch.float64)
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    assert metrics.fvu(x, x) == 0.0


def test_fvu_mse_nmse_hand_values():
    x = np.array([[1.0, 0.0], [3.0, 2.0]])
    x_hat = np.array([[1.0, 1.0], [2.0, 2.0]])
    # squared errors 0,1,1,0 -> sum 2; deviations from column means (2,1): 1,1,1,1 -> 4
    assert metrics.fvu(x, x_hat) == pytest.approx(0.5)
    assert metrics.mse(x, x_hat) == pytest.approx(0.5)
    assert metrics.nmse_db(x, x_hat) == pytest.approx(10 * np.log10(2 / 14))


def test_support_scores_hand_values():
    true = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    est = np.array([[0.5, 0.3, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    s = metrics.support_scores(true, est)
    # hits: (0,0), (1,1) -> 2; predicted 4; true 3
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 2 / 7)
    assert metrics.mean_l0(est) == pytest.approx(2.0)


def test_code_mcc_of_permuted_rescaled_copy_is_one():
    codes = torch.randn(200, 6, dtype=torch.float64).abs()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    scaled = codes[:, perm] * torch.tensor([2.0, 0.5, 3.0, 1.0, 7.0, 0.1], dtype=torch.float64)
    assert metrics.code_mcc(codes, scaled) == pytest.approx(1.0)
    assert metrics.code_mcc(codes, -scaled) == pytest.approx(1.0)


def test_code_mcc_hand_value_and_constant_columns():
    a = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0]])
    b = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])     # column 1 constant -> correlation 0
    # column 0 matches column 0 with r=1; column 1 pairs with the constant column: 0
    assert metrics.code_mcc(a, b) == pytest.approx(0.5)


def test_code_mcc_rectangular_uses_min_pairs():
    codes = torch.randn(100, 3, dtype=torch.float64)
    wider = torch.cat([codes, torch.randn(100, 2, dtype=torch.float64)], dim=1)
    assert metrics.code_mcc(codes, wider) == pytest.approx(1.0)


def test_dictionary_mcc_permuted_sign_flipped_atoms():
    atoms = torch.randn(8, 20, dtype=torch.float64)
    other = -atoms[torch.randperm(8)] * 3.0
    assert metrics.dictionary_mcc(atoms, other) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="d=20 and d=10"):
        metrics.dictionary_mcc(atoms, torch.randn(8, 10))


def test_lasso_objective_and_gap_hand_values():
    x = np.array([[1.0, 2.0]])
    atoms = np.array([[1.0, 0.0], [0.0, 1.0]])
    z = np.array([[1.0, 1.0]])
    # residual (0, 1): 0.5 * 1 + 0.5 * (1 + 1) = 1.5
    assert float(metrics.lasso_objective(x, z, atoms, 0.5)[0]) == pytest.approx(1.5)
    assert metrics.relative_gap(torch.tensor([1.1, 2.2]), torch.tensor([1.0, 2.0])) == pytest.approx(0.1)


def test_dead_and_dense_fractions():
    codes = np.array([[1.0, 0.0, 0.0, 2.0], [1.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(metrics.firing_rates(codes).numpy(), [1.0, 0.0, 1 / 3, 1 / 3])
    assert metrics.dead_fraction(codes) == pytest.approx(0.25)
    assert metrics.dense_fraction(codes) == pytest.approx(0.25)
    assert metrics.dense_fraction(codes, threshold=0.3) == pytest.approx(0.75)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"shapes differ, \(2, 3\) vs \(2, 4\)"):
        metrics.mse(np.zeros((2, 3)), np.zeros((2, 4)))
