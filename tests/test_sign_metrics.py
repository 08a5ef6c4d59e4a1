"""Golden values of every sign metric (hand-computed cases), and the spectral test's power both ways."""

import math

import pytest
import torch
from test_analyze import seeded_llama

from hf_signlock.errors import MissingDependencyError, SignLockConfigError
from hf_signlock.evaluation import sign_metrics as m
from hf_signlock.evaluation.references import resolve_reference
from hf_signlock.targets import find_target_modules

# an orthogonal +-1 matrix: every singular value is sqrt(4) = 2
HADAMARD4 = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)


def test_flip_rate_of_a_2x3_weight_counts_zero_as_flipped():
    weight = torch.tensor([[0.5, -0.2, 0.0], [-0.0, 0.3, -1.0]])
    signs = torch.tensor([[1, 1, 1], [-1, -1, -1]], dtype=torch.int8)
    # agree: 0.5 vs +1, -1.0 vs -1; flipped: -0.2 vs +1, 0.0 and -0.0 (zeros), 0.3 vs -1
    assert m.flip_count(weight, signs) == 4
    assert m.flip_rate(weight, signs) == pytest.approx(4 / 6)
    assert m.flip_rate(weight, torch.where(weight > 0, 1, -1).to(torch.int8)) == pytest.approx(2 / 6)  # the zeros


def test_flip_rate_refuses_mismatched_shapes_and_empty_weights():
    with pytest.raises(SignLockConfigError, match=r"\(2, 3\).*\(3, 2\)"):
        m.flip_rate(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.int8))
    with pytest.raises(SignLockConfigError, match="empty"):
        m.flip_rate(torch.ones(0, 3), torch.ones(0, 3, dtype=torch.int8))


def test_near_zero_fraction_with_a_given_scale_and_with_the_layers_own_std():
    weight = torch.tensor([0.01, -0.05, 0.2, -0.3])
    assert m.near_zero_fraction(weight, band=0.1, scale=1.0) == 0.5  # 0.01 and -0.05 are below 0.1
    assert m.near_zero_fraction(weight, band=1.0, scale=0.1) == 0.5  # the same band, in other units
    assert m.near_zero_fraction(weight, band=0.0, scale=1.0) == 0.0
    # own std: mean 0, sum of squares 18.02, unbiased std sqrt(18.02 / 3) = 2.4508; 0.1 x that = 0.245 > |0.1|
    weight = torch.tensor([3.0, -3.0, 0.1, -0.1])
    assert m.near_zero_fraction(weight, band=0.1) == 0.5
    assert m.near_zero_fraction(weight, band=0.1 / math.sqrt(18.02 / 3) * 0.0999) == 0.0
    with pytest.raises(SignLockConfigError, match="near_zero_band"):
        m.near_zero_fraction(weight, band=-1.0)


def test_sign_matrix_counts_zero_as_plus_one():
    signs = m.sign_matrix(torch.tensor([[0.0, -0.0, -2.0], [3.0, -1e-30, 1e-30]]))
    assert signs.dtype == torch.float64
    assert signs.tolist() == [[1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]  # -0.0 >= 0 too


def test_normalised_singular_values_golden():
    # rank one all-ones 2x2: s = (2, 0), ||A||_F = 2, k = 2 -> s sqrt(2) / 2
    values = m.normalised_singular_values(torch.ones(2, 2))
    assert values.tolist() == pytest.approx([math.sqrt(2), 0.0])
    # an orthogonal sign matrix: s = 2 = sqrt(max dim) everywhere -> 1
    assert m.normalised_singular_values(HADAMARD4).tolist() == pytest.approx([1.0] * 4)
    # scale-free, and wide or tall alike: diag(3, 4) -> s = (4, 3), ||A||_F = 5 -> (4, 3) sqrt(2) / 5
    expected = [4 * math.sqrt(2) / 5, 3 * math.sqrt(2) / 5]
    assert m.normalised_singular_values(torch.diag(torch.tensor([3.0, 4.0]))).tolist() == pytest.approx(expected)
    assert m.normalised_singular_values(100 * torch.tensor([[3.0, 0, 0], [0, 4.0, 0]])).tolist() == pytest.approx(expected)
    assert m.normalised_singular_values(torch.tensor([[3.0, 0], [0, 4.0], [0, 0]])).tolist() == pytest.approx(expected)


def test_rank_errors_golden():
    u, v = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 1.0, -1.0, 2.0])
    assert m.rank_error(torch.outer(u, v), 1) == pytest.approx(0.0, abs=1e-7)  # rank one: nothing left at r = 1
    assert m.rank_errors(m.singular_values(torch.outer(u, v)), [1, 2, 10]) == pytest.approx([0, 0, 0], abs=1e-7)
    # diag(3, 4): the best rank-1 approximation leaves the 3 -> sqrt(9 / 25) = 0.6; r = 0 leaves everything
    assert m.rank_errors(torch.tensor([4.0, 3.0]), [0, 1, 2]) == pytest.approx([1.0, 0.6, 0.0])
    # Hadamard: equal singular values, so rank r leaves sqrt((4 - r) / 4)
    assert m.rank_errors(m.singular_values(HADAMARD4), [1, 2, 3, 4]) == pytest.approx(
        [math.sqrt(3 / 4), math.sqrt(2 / 4), math.sqrt(1 / 4), 0.0])
    assert m.rank_errors(torch.zeros(3), [1]) == [0.0]


def test_rademacher_matrix_is_seeded_and_cached_spectra_cannot_be_corrupted():
    a, b = m.rademacher_matrix((6, 5), seed=7), m.rademacher_matrix((6, 5), seed=7)
    assert torch.equal(a, b) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a, m.rademacher_matrix((6, 5), seed=8))
    values = m.rademacher_singular_values((6, 5), seed=7)
    assert torch.allclose(values, m.singular_values(a))
    values.zero_()  # the cache hands out copies
    assert m.rademacher_singular_values((6, 5), seed=7).abs().sum() > 0


def test_spectral_test_matches_itself_exactly():
    result = m.spectral_ks_test(m.rademacher_matrix((64, 32), seed=0), seed=0)  # the baseline itself
    assert result["statistic"] == 0.0 and result["pvalue"] == 1.0
    assert result["top_singular_value"] == result["rademacher_top_singular_value"]
    # Marchenko-Pastur: the top normalised value of random signs is near 1 + sqrt(32 / 64) = 1.71
    assert 1.4 < result["top_singular_value"] < 1.9


def test_a_rademacher_matrix_passes_the_spectral_test():
    result = m.spectral_ks_test(m.rademacher_matrix((256, 128), seed=123), seed=0)
    assert result["pvalue"] > 0.01
    assert result["statistic"] < 0.1


def test_a_low_rank_sign_matrix_fails_the_spectral_test():
    generator = torch.Generator().manual_seed(0)
    u, v = torch.randn(256, 2, generator=generator), torch.randn(128, 2, generator=generator)
    signs = m.sign_matrix(u @ v.T)  # sign of a rank-2 matrix
    result = m.spectral_ks_test(signs, seed=0)
    assert result["pvalue"] < 1e-6
    assert result["top_singular_value"] > 2 * result["rademacher_top_singular_value"]
    # and it is far easier to approximate at low rank than random signs of the same shape
    ours = m.rank_errors(m.singular_values(signs), [2])[0]
    random = m.rank_errors(m.rademacher_singular_values((256, 128), 0), [2])[0]
    assert ours < 0.7 < random


def test_missing_scipy_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "hf-signlock\[analysis\]"'):
        m.spectral_ks_test(HADAMARD4)


def test_flip_report_counts_each_flip_and_zero(tmp_path):
    model = seeded_llama()
    up = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        up[0, :3].neg_()  # three flips
        up[5, 7] = 0.0  # a zero is a flip
    reference = resolve_reference(str(tmp_path), "seed:5", model)  # a folder that records nothing
    report = m.flip_report(model, reference)
    weights = sum(module.weight.numel() for module in find_target_modules(model).values())
    assert report["weights"] == weights == 2 * (32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3)
    assert report["flips"] == 4 and report["flip_rate"] == pytest.approx(4 / weights)
    assert report["layers"]["model.layers.1.mlp.up_proj.weight"] == pytest.approx(4 / (64 * 32))
    assert report["layers"]["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert report["reference"] == "seed 5 (seed signs)"
    assert m.flip_report(model, None)["flip_rate"] is None  # nothing recorded, nothing given
