"""The fast paths of the ensemble predictor (issue 14): SciPy's LAPACK/BLAS instead of torch's,
and the float32 eigendecomposition of a float32 kernel, each against a float64 oracle; and the
float32 path's conditioning check, which must fall back to float64 on an ill-conditioned kernel.

Oracle: the same predictor with ``_linalg.USE_SCIPY = False`` (torch's ``eigh``/``matmul``) on
float64 inputs, itself checked against the closed forms / matrix exponentials in
``tests/test_predict.py`` and ``tests/test_predict_nt_order.py``.
"""
import pytest
import torch

from ntkit import _linalg
from ntkit import predict as P

F64 = torch.float64
TS = torch.tensor([0.0, 0.5, 3.0, 40.0, float("inf")], dtype=F64)


def _problem(n=40, m=7, k=3, d=12, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    xt = torch.randn(m, d, generator=g, dtype=F64)
    y = torch.randn(n, k, generator=g, dtype=F64)
    kdt = [dtype]                                  # the kernels' dtype (a test may change it)

    def kfn(a, b, get):
        same = b is None
        a, b = a.double(), (a if same else b).double()
        lin = a @ b.T / a.shape[1]
        out = {"nngp": 0.5 + lin + 0.3 * torch.exp(-torch.cdist(a, b) ** 2 / 20),
               "ntk": 1.0 + 2 * lin + (lin + 1) ** 2 + 0.5 * torch.exp(-torch.cdist(a, b) / 4)}
        if same:
            out = {h: 0.5 * (v + v.T) for h, v in out.items()}
        if isinstance(get, str):
            return out[get].to(kdt[0])
        return {h: out[h].to(kdt[0]) for h in get}
    kfn.kdt = kdt
    return kfn, x.to(dtype), xt.to(dtype), y.to(dtype)


def _ensemble(kfn, x, xt, y, t=TS, get="ntk", ridge=1e-3):
    _linalg.clear_cache()
    return P.gradient_descent_mse_ensemble(kfn, x, y, diag_reg=ridge)(t, xt, get, True)


@pytest.mark.parametrize("get", ["ntk", "nngp"])
@pytest.mark.parametrize("test_set", [True, False])
def test_scipy_and_torch_paths_agree_in_float64(monkeypatch, get, test_set):
    pytest.importorskip("scipy")
    kfn, x, xt, y = _problem()
    xt = xt if test_set else None
    monkeypatch.setattr(_linalg, "USE_SCIPY", True)
    fast = _ensemble(kfn, x, xt, y, get=get)
    monkeypatch.setattr(_linalg, "USE_SCIPY", False)
    ref = _ensemble(kfn, x, xt, y, get=get)
    for a, b in ((fast.mean, ref.mean), (fast.covariance, ref.covariance)):
        assert a.dtype == F64 and a.shape == b.shape
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))


def test_sym_eigh_and_matmul_lower_match_torch():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 30, generator=g, dtype=F64)
    a = a @ a.T
    w, v = _linalg.sym_eigh(a)
    w_t, _ = torch.linalg.eigh(a)
    assert torch.allclose(w, w_t, rtol=0, atol=1e-10 * float(w_t[-1]))
    assert torch.allclose(v @ torch.diag(w) @ v.T, a, rtol=0, atol=1e-10 * float(w_t[-1]))
    assert torch.allclose(v.T @ v, torch.eye(30, dtype=F64), atol=1e-12)
    low = torch.linalg.cholesky(a)
    x = torch.randn(2, 5, 30, generator=g, dtype=F64)
    for dt in (F64, torch.float32):
        got = _linalg.matmul_lower(x.to(dt), low.to(dt))
        assert got.dtype == dt and got.shape == x.shape
        tol = 1e-12 if dt == F64 else 1e-5
        assert torch.allclose(got.double(), x @ low, rtol=tol, atol=tol * float(low.abs().max()))


def test_float32_kernel_uses_the_float32_eigendecomposition_within_tolerance(monkeypatch):
    """A well-conditioned float32 kernel (cond ~ 1e2) is decomposed in float32; mean and
    covariance stay within 2e-5 (relative to their largest entry) of the float64 computation
    on the same float32 inputs (measured ~2e-6; the bound the check allows is
    cond * eps32 ~ 1e-5 here)."""
    kfn, x, xt, y = _problem(dtype=torch.float32)
    f = _linalg.factorize(kfn(x, None, "ntk"), 1e-3, False)
    evals, V, live = f.working_spectrum()
    assert V.dtype == torch.float32 and bool(live.all())
    assert float(evals[0]) >= 1e-4 * float(evals[-1])
    got = _ensemble(kfn, x, xt, y)
    assert got.mean.dtype == torch.float32 and got.covariance.dtype == torch.float32
    kfn.kdt[0] = F64
    kd32 = {h: v.double() for h, v in kfn(x, None, ("nngp", "ntk")).items()}
    kfn.kdt[0] = torch.float32
    assert not torch.equal(kd32["ntk"], kfn(x, None, "ntk").double())   # float32 rounding

    def kfn64(a, b, get):              # float64 copies of the same float32 kernels
        kfn.kdt[0] = torch.float32
        res = kfn(a, b, (get,) if isinstance(get, str) else get)
        return {h: v.double() for h, v in res.items()}
    ref = _ensemble(kfn64, x, xt, y)
    for a, b in ((got.mean, ref.mean), (got.covariance, ref.covariance)):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 2e-5, err


def test_ill_conditioned_float32_kernel_falls_back_to_float64():
    """cond = 1e6 > 1e4: the float32 eigendecomposition is refused and the float64 one is used,
    so the float32 answer is the float64 answer rounded (a float32 eigh would be off by
    ~cond * eps32 ~ 0.1 relative)."""
    n = 30
    g = torch.Generator().manual_seed(5)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.logspace(0, -6, n, dtype=F64)
    phi = U * lam.sqrt()
    K32 = (phi @ phi.T).float()
    f = _linalg.factorize(K32)
    evals, V, _ = f.working_spectrum()
    assert V.dtype == F64                                         # the fallback triggered
    assert V is f.spectrum()[1]
    pt = torch.randn(4, n, generator=g, dtype=F64)
    y = torch.randn(n, 2, generator=g, dtype=F64).float()

    def kfn(a, b, get):
        a_ = phi if a is K32 else pt
        b_ = phi if (b is None and a is K32) or b is K32 else pt
        mat = (a_ @ b_.T).float()
        return mat if isinstance(get, str) else {h: mat for h in get}
    t = torch.tensor([1e3, 1e6])
    got = P.gradient_descent_mse_ensemble(kfn, K32, y)(t, pt, "ntk", True)
    K64 = K32.double()
    w, Vt = torch.linalg.eigh(K64)
    ktd = (pt @ phi.T).float().double()
    ktt = (pt @ pt.T).float().double()
    N = y.numel()
    for i, ti in enumerate(t.tolist()):
        live = w > n * torch.finfo(torch.float32).eps * w[-1]       # float32 null cutoff
        q = torch.where(live, -torch.expm1(-w * ti / N) / w, torch.zeros_like(w))
        Q = ktd @ Vt @ torch.diag(q) @ Vt.T
        mean = Q @ y.double()
        cov = ktt + Q @ K64 @ Q.T - Q @ ktd.T - ktd @ Q.T
        assert torch.allclose(got.mean[i].double(), mean, rtol=1e-4,
                              atol=1e-4 * float(mean.abs().max()))
        assert torch.allclose(got.covariance[i].double(), cov, rtol=1e-3,
                              atol=1e-3 * float(cov.abs().max()))


def test_scipy_blas_threads_are_capped():
    """SciPy's OpenBLAS busy-waits: small calls run on one BLAS thread, large ones on at most
    torch's thread count (a 30x slowdown beside busy processes otherwise)."""
    tp = pytest.importorskip("threadpoolctl")
    pytest.importorskip("scipy.linalg")

    def blas_threads():
        return [i["num_threads"] for i in tp.threadpool_info() if i["user_api"] == "blas"]
    if not blas_threads():
        pytest.skip("no BLAS library visible to threadpoolctl")
    with _linalg._BlasThreads(_linalg.SCIPY_MIN_N - 1):
        assert set(blas_threads()) == {1}
    with _linalg._BlasThreads(_linalg.SCIPY_MIN_N):
        assert max(blas_threads()) <= max(1, torch.get_num_threads())
