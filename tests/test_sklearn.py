import warnings

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import check_estimator

import sparsecode as sc
from sparsecode.sklearn import FIXED_DICTIONARY_CHECKS, DictionaryLearner, SparseEncoder


def _run(estimator, expected=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None, expected_failed_checks=expected or {})
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed
    assert sum(r["status"] == "passed" for r in results) > 30


@pytest.mark.parametrize("encoder, params", [("fista", {"lam": 0.1}), ("omp", {"k": 2})])
def test_sparse_encoder_passes_check_estimator(encoder, params):
    atoms = np.random.default_rng(0).normal(size=(4, 3))
    _run(SparseEncoder(dictionary=atoms, encoder=encoder, encoder_params=params), FIXED_DICTIONARY_CHECKS)


def test_dictionary_learner_passes_check_estimator():
    _run(DictionaryLearner(n_atoms=3, method="sparse-coding", method_params={"inference": "omp", "k": 1, "n_iter": 3}))


def test_transform_inverse_transform_and_pipeline():
    data = sc.synthetic.make_sparse_data(n_samples=300, d=16, n_atoms=32, k=3, seed=0, noise=0.01)
    X = data.x.double().numpy()
    est = SparseEncoder(data.dictionary.atoms.double().numpy(), "omp", {"k": 3}).fit(X)
    codes = est.transform(X)
    assert isinstance(codes, np.ndarray) and codes.shape == (300, 32)
    np.testing.assert_array_equal((codes != 0).sum(1), 3)
    assert np.mean((est.inverse_transform(codes) - X) ** 2) < 1e-3
    assert est.get_params() == {"dictionary": est.dictionary, "encoder": "omp", "encoder_params": {"k": 3}}
    pipe = make_pipeline(FunctionTransformer(), SparseEncoder(data.dictionary.atoms.double().numpy(), "fista",
                                                              {"lam": 0.05}))
    assert pipe.fit_transform(X).shape == (300, 32)
    learner = DictionaryLearner(n_atoms=32, method="sparse-coding",
                                method_params={"inference": "omp", "k": 3, "n_iter": 20}).fit(X)
    assert learner.components_.shape == (32, 16)
    assert sc.metrics.dictionary_mcc(data.dictionary.atoms, learner.components_) > 0.8
    with pytest.raises(ValueError, match="X has 5 features but the dictionary's atoms have d=16"):
        SparseEncoder(data.dictionary.atoms.numpy()).fit(X[:, :5])
    with pytest.raises(ValueError, match="needs a dictionary"):
        SparseEncoder().fit(X)
