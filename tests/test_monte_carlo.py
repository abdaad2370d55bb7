"""monte_carlo_kernel's record: a cross-kernel is not symmetric, and cov1/cov2 are the estimated
NNGP variances of the examples (the diagonals of the self-kernels of the same networks)."""
import torch

from ntkit import monte_carlo_kernel


def test_cross_kernel_is_not_symmetric_and_carries_both_variances(randn64, small_fc_arch):
    x1, x2 = randn64(4, 3), randn64(3, 3, seed=1)
    kw = dict(width=64, n_samples=2, seed=0)
    cross = monte_carlo_kernel(small_fc_arch, x1, x2, **kw)
    assert not cross.symmetric and cross.cov2 is not None
    assert cross.nngp.shape == cross.ntk.shape == (4, 3)
    # the same networks (same seeds) on each side: the variances are the self-kernels' diagonals
    s1 = monte_carlo_kernel(small_fc_arch, x1, **kw)
    s2 = monte_carlo_kernel(small_fc_arch, x2, **kw)
    assert s1.symmetric
    torch.testing.assert_close(cross.cov1, s1.nngp.diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(cross.cov2, s2.nngp.diagonal(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s1.cov1, s1.nngp.diagonal(), rtol=1e-12, atol=0)
    # and the cross estimate is the off-diagonal block of the joint estimate
    both = monte_carlo_kernel(small_fc_arch, torch.cat([x1, x2]), **kw)
    torch.testing.assert_close(cross.nngp, both.nngp[:4, 4:], rtol=1e-12, atol=1e-14)
    # only the NTK asked for: still a record whose symmetry follows x2
    ntk_only = monte_carlo_kernel(small_fc_arch, x1, x2, get=("ntk",), **kw)
    assert ntk_only.nngp is None and not ntk_only.symmetric
    torch.testing.assert_close(ntk_only.ntk, cross.ntk, rtol=1e-12, atol=0)
