"""FanInProd (product of independent branches) and repeat: hand-derived closed forms and
Monte Carlo from the finite networks."""
import pytest
import torch

from ntkit import layers as nl
from ntkit.testing import KernelTestCase, mc_error_slope
from tests._helpers import randn64


def test_quadratic_network_closed_form():
    """f = w . (A x + a) * (B x + b): nngp_i = s_i^2 <x, x'> / d + t_i^2 = ntk_i; the readout
    gives nngp = w^2 n1 n2 and ntk = nngp + w^2 (ntk1 n2 + n1 ntk2) = 3 w^2 n1 n2."""
    x1, x2 = randn64(4, 3), randn64(3, 3, seed=1)
    arch = nl.serial(nl.FanOut(2), nl.parallel(nl.Dense(8, 1.3, 0.4), nl.Dense(8, 0.7, 0.2)),
                     nl.FanInProd(), nl.Dense(1, 1.5))
    for a, b in ((x1, x2), (x1, x1), (x1, None)):
        bb = a if b is None else b
        g = a @ bb.T / 3
        n1, n2 = 1.3 ** 2 * g + 0.4 ** 2, 0.7 ** 2 * g + 0.2 ** 2
        k = arch.kernel(a, b)
        torch.testing.assert_close(k.nngp, 1.5 ** 2 * n1 * n2, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(k.ntk, 3 * 1.5 ** 2 * n1 * n2, rtol=1e-13, atol=1e-14)


def test_product_with_parameter_free_branch():
    """Identity branch: its NTK is zero, so ntk = ntk_dense * nngp_input (product rule)."""
    x = randn64(4, 3)
    arch = nl.serial(nl.FanOut(2), nl.parallel(nl.Identity(), nl.Dense(3, 1.2, 0.3)),
                     nl.FanInProd(), nl.Dense(1))
    g = x @ x.T / 3
    nd = 1.2 ** 2 * g + 0.09
    k = arch.kernel(x)
    torch.testing.assert_close(k.nngp, g * nd, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(k.ntk, g * nd + nd * g, rtol=1e-13, atol=1e-14)


def test_fan_in_prod_errors():
    with pytest.raises(ValueError, match="FanInProd"):
        nl.serial(nl.Dense(4), nl.FanInProd()).kernel(randn64(2, 3))
    bad = nl.serial(nl.FanOut(2), nl.parallel(nl.Dense(4), nl.Dense(5)), nl.FanInProd(),
                    nl.Dense(1))
    with pytest.raises(ValueError, match="equal shape"):
        bad.kernel(randn64(2, 3))
    with pytest.raises(ValueError, match="equal shape"):
        bad.module(3)
    # the product is not Gaussian: an activation right after it is refused
    with pytest.raises(ValueError, match="Gaussian"):
        nl.serial(nl.FanOut(2), nl.parallel(nl.Dense(4), nl.Dense(4)), nl.FanInProd(),
                  nl.Relu(), nl.Dense(1)).kernel(randn64(2, 3))


def test_finite_module_multiplies():
    mod = nl.serial(nl.FanOut(2), nl.parallel(nl.Dense(4), nl.Dense(4)), nl.FanInProd()).module(
        3, seed=0)
    x = randn64(2, 3)
    a, b = mod[1](mod[0](x))
    torch.testing.assert_close(mod(x), a * b)


class TestFanInProdMonteCarlo(KernelTestCase):
    """Measured (4 seeds, widths 16..1024): NNGP 0.97, 0.61, 0.24, 0.084 (slope -0.59);
    NTK 0.85, 0.31, 0.17, 0.077 (slope -0.56)."""

    def build(self):
        return nl.serial(nl.Dense(8, 1.2, 0.1), nl.Relu(), nl.FanOut(2),
                         nl.parallel(nl.Dense(8, 1.1, 0.2),
                                     nl.serial(nl.Dense(8), nl.Erf(), nl.Dense(8, 0.9, 0.1))),
                         nl.FanInProd(), nl.Dense(1))


def test_fan_in_prod_conv_monte_carlo():
    """Pixel-pair layout (pooling below): products per pixel pair; MC error ~ width^-1/2.
    Measured NTK errors 0.26, 0.19, 0.12, 0.064 at widths 16..1024; an NTK without the
    product rule's second term stays at 0.87, 0.90, 0.51."""
    arch = nl.serial(nl.Conv(8, 2, W_std=1.3, b_std=0.1), nl.Relu(), nl.FanOut(2),
                     nl.parallel(nl.Conv(8, 2, padding="SAME", W_std=1.2, b_std=0.2),
                                 nl.Conv(8, 1, W_std=0.9)),
                     nl.FanInProd(), nl.AvgPool(2, 1), nl.Flatten(), nl.Dense(1))
    x = torch.cat([randn64(3, 2, 4, 4), randn64(2, 2, 4, 4, seed=3)])
    for get, widths in (("nngp", (32, 128, 512)), ("ntk", (16, 64, 256))):
        slope, errs = mc_error_slope(arch, x, widths, get=get, n_samples=2, seeds=2)
        assert -0.95 < slope < -0.25, (get, slope, errs)
        assert errs[-1] < 0.2, (get, errs)


def test_repeat_is_serial_of_copies():
    x = randn64(4, 3)
    block = nl.serial(nl.Dense(6, 1.3, 0.1), nl.Relu())
    r = nl.repeat(block, 3)
    explicit = nl.serial(block, block, block)
    assert r == explicit
    k, ke = r.kernel(x), nl.serial(nl.Dense(6, 1.3, 0.1), nl.Relu(), nl.Dense(6, 1.3, 0.1),
                                   nl.Relu(), nl.Dense(6, 1.3, 0.1), nl.Relu()).kernel(x)
    torch.testing.assert_close(k.nngp, ke.nngp, rtol=0, atol=0)
    torch.testing.assert_close(k.ntk, ke.ntk, rtol=0, atol=0)
    # depth matters (not silently one copy)
    assert not torch.allclose(nl.repeat(block, 1).kernel(x).nngp, k.nngp)
    # each copy has its own parameters in the finite network
    net = nl.serial(r, nl.Dense(1)).module(3, width=16, seed=0)
    denses = [m for m in net.modules() if hasattr(m, "weight")]
    assert len(denses) == 4
    assert not torch.equal(denses[1].weight, denses[2].weight)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_repeat_bad_n(n):
    with pytest.raises(ValueError, match="n"):
        nl.repeat(nl.Relu(), n)
    with pytest.raises(TypeError):
        nl.repeat(lambda x: x, 2)
