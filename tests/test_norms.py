"""Each norm's forward (and, for the batch-statistics norms, backward) against its formula written out."""

import math

import pytest
import torch
import torch.nn.functional as F

from workbench.config import ModelConfig
from workbench.norms import get_scheme, scheme_names

D = 16
EPS = 1e-5


def make(norm, layer=0, site="ln1", **kwargs):
    cfg = ModelConfig(norm=norm, d_model=D, n_heads=2, n_layers=4, norm_kwargs=kwargs)
    return get_scheme(norm).make(cfg.norm_context, layer, site)


def randomize_affine(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))


@pytest.fixture
def x():
    return torch.randn(3, 5, D) * 3 + 1.5


def test_layernorm_formula(x):
    """pre-ln: (x - mean) / sqrt(var + eps) * w + b, and F.layer_norm agrees."""
    m = make("pre-ln"); randomize_affine(m)
    w, b = m.affine.w, m.affine.b
    mu = x.sum(-1, keepdim=True) / D
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / D
    expected = (x - mu) / torch.sqrt(var + EPS) * w + b
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x), F.layer_norm(x, (D,), w, b, EPS), atol=1e-5, rtol=1e-5)


def test_rmsnorm_formula(x):
    """pre-rms: x / sqrt(mean(x^2) + eps) * w, no bias."""
    m = make("pre-rms"); randomize_affine(m)
    assert m.affine.b is None
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) / D + EPS) * m.affine.w
    torch.testing.assert_close(m(x), expected)


def test_crmsnorm_is_layernorm_of_the_decompressed_vector(x):
    """pre-crms on x equals the first d coordinates of LayerNorm on the zero-mean z = [x, -sum(x)]."""
    m = make("pre-crms")
    z = torch.cat([x, -x.sum(-1, keepdim=True)], -1)
    assert torch.allclose(z.mean(-1), torch.zeros(()), atol=1e-4)
    ln_z = F.layer_norm(z, (D + 1,), eps=EPS)
    torch.testing.assert_close(m(x), ln_z[..., :D], atol=1e-5, rtol=1e-5)


def test_srms_formula_and_no_parameters(x):
    """srms: x / ||x|| * sqrt(d), parameter-free."""
    m = make("srms")
    assert not list(m.parameters())
    torch.testing.assert_close(m(x), x / x.norm(dim=-1, keepdim=True) * math.sqrt(D), atol=1e-4, rtol=1e-4)


def test_dyt_formula(x):
    """dyt: w * tanh(alpha * x) + b with a learned scalar alpha (init 0.5); hook_scale = 1/alpha."""
    m = make("dyt"); randomize_affine(m)
    assert m.standardize.alpha.shape == ()
    expected = m.affine.w * torch.tanh(m.standardize.alpha * x) + m.affine.b
    torch.testing.assert_close(m(x), expected)
    seen = {}
    m.hook_scale.add_hook(lambda t, hook: seen.setdefault("s", t))
    m(x)
    torch.testing.assert_close(seen["s"].reshape(()), 1 / m.standardize.alpha)


def test_none_is_identity(x):
    m = make("none")
    assert not list(m.parameters())
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_lns_scales_block_norms_by_inverse_sqrt_depth(x, layer):
    """lns: block l's norm output = LayerNorm(x) / sqrt(l + 1); the final norm is unscaled."""
    m = make("lns", layer=layer); randomize_affine(m)
    ln = F.layer_norm(x, (D,), m.affine.w, m.affine.b, EPS)
    torch.testing.assert_close(m(x), ln / math.sqrt(layer + 1), atol=1e-5, rtol=1e-5)
    final = make("lns", layer=None, site="ln_final")
    torch.testing.assert_close(final(x), F.layer_norm(x, (D,), eps=EPS), atol=1e-5, rtol=1e-5)


def test_batchnorm_train_and_eval(x):
    """batchnorm: per-feature stats over batch x position in training; running stats in eval."""
    m = make("batchnorm"); randomize_affine(m)
    flat = x.reshape(-1, D)
    mu, var = flat.mean(0), flat.var(0, unbiased=False)
    expected = (x - mu) / torch.sqrt(var + EPS) * m.affine.w + m.affine.b
    m.train()
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)
    running_mean = 0.9 * torch.zeros(D) + 0.1 * mu
    running_var = 0.9 * torch.ones(D) + 0.1 * flat.var(0, unbiased=True)
    m.eval()
    expected_eval = (x - running_mean) / torch.sqrt(running_var + EPS) * m.affine.w + m.affine.b
    torch.testing.assert_close(m(x), expected_eval, atol=1e-5, rtol=1e-5)


def test_batchnorm_leaks_across_positions():
    """The failure baseline: in training, changing a later token changes an earlier token's output."""
    m = make("batchnorm").train()
    x = torch.randn(2, 6, D)
    y1 = m(x)
    x2 = x.clone(); x2[:, -1] += 10
    assert not torch.allclose(m(x2)[:, 0], y1[:, 0])


def test_powernorm_forward_and_approximate_backward():
    """powernorm: warm-up divides by the batch quadratic mean; afterwards by the running psi from the
    previous step; the backward is (g - nu x_hat)/scale with nu updated by its recursion."""
    torch.manual_seed(1)
    a = 0.9
    m = make("powernorm", warmup=2).standardize.train()
    hook = lambda t: t  # noqa: E731
    psi = torch.ones(D)
    nu = torch.zeros(D)
    for t in range(1, 6):
        x = (torch.randn(4, 3, D) * 2).requires_grad_()
        phi = x.detach().reshape(-1, D).pow(2).mean(0)
        stat = phi if t <= 2 else psi.clone()
        if t < 2:
            psi = psi * (t - 1) / t + phi / t
        psi = a * psi + (1 - a) * phi
        scale = torch.sqrt(stat + EPS)
        y = m(x, hook)
        torch.testing.assert_close(y, x.detach() / scale, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        x_hat = x.detach() / scale
        torch.testing.assert_close(x.grad, (g - nu * x_hat) / scale, atol=1e-5, rtol=1e-5)
        nu = nu * (1 - (1 - a) * x_hat.pow(2).reshape(-1, D).mean(0)) + (1 - a) * (g * x_hat).reshape(-1, D).mean(0)
        torch.testing.assert_close(m.nu, nu, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.running_phi, psi, atol=1e-6, rtol=1e-5)
    m.eval()
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(m(x, hook), x / torch.sqrt(psi + EPS))


def test_unified_windowed_forward_and_compensated_backward():
    """unified: after the window fills, divide by the geometric mean of the last M batch quadratic
    means; backward subtracts the EMA of the windowed mean of mean(g * x_hat)."""
    torch.manual_seed(2)
    M, mom = 3, 0.9
    m = make("unified", window=M, warmup=0).standardize.train()
    hook = lambda t: t  # noqa: E731
    stats, grads, nu, running = [], [], torch.zeros(D), torch.ones(D)
    for t in range(1, 8):
        x = (torch.randn(4, 3, D) * (1 + t)).requires_grad_()
        s = x.detach().reshape(-1, D).pow(2).mean(0)
        stats = (stats + [s])[-M:]
        use_window = t > M
        var = torch.stack(stats).log().mean(0).exp() if use_window else s
        running = mom * running + (1 - mom) * var
        y = m(x, hook)
        scale = torch.sqrt(var + EPS)
        torch.testing.assert_close(y, x.detach() / scale, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        x_hat = x.detach() / scale
        c = (g * x_hat).reshape(-1, D).mean(0)
        grads = (grads + [c])[-M:]
        mu = torch.stack(grads).mean(0) if use_window else c
        nu = mom * nu + (1 - mom) * mu
        torch.testing.assert_close(x.grad, (g - nu * x_hat) / scale, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.running_var, running, atol=1e-4, rtol=1e-5)


def test_qk_norm_formula_per_head(x):
    """qk-norm: its block norms are RMSNorm; each head's query is q_h / sqrt(mean_e q_he² + eps) · w over d_head."""
    from workbench.model import GPT
    from workbench.norms.qk_norm import head_norm

    m = make("qk-norm"); randomize_affine(m)
    torch.testing.assert_close(m(x), x / torch.sqrt((x * x).sum(-1, keepdim=True) / D + EPS) * m.affine.w)
    q = torch.randn(3, 5, 4, 6) * 2 + 0.5  # [batch, pos, head, d_head]
    n = head_norm(6, EPS); randomize_affine(n)
    want = torch.stack([q[:, :, h] / torch.sqrt((q[:, :, h] ** 2).sum(-1, keepdim=True) / 6 + EPS) for h in range(4)], 2)
    torch.testing.assert_close(n(q), want * n.affine.w)
    seen = []
    n.hook_scale.add_hook(lambda s, hook: seen.append(s))
    n(q)
    assert seen[0].shape == (3, 5, 4, 1)
    attn = GPT(ModelConfig(norm="qk-norm", d_model=D, n_heads=2, n_layers=1)).blocks[0].attn
    assert attn.q_norm.affine.w.shape == attn.k_norm.affine.w.shape == (D // 2,)


def test_every_registered_norm_is_tested_here():
    tested = {"pre-ln", "post-ln", "mix-ln", "lns", "pre-rms", "pre-crms", "powernorm", "unified", "batchnorm",
              "dyt", "srms", "qk-norm", "none", "peri-ln", "post-sub",  # these two: tests/test_peri_ln.py
              "peri-rms"}  # Gemma's sandwich: tests/test_gemma.py
    assert set(scheme_names()) == tested


def test_registering_twice_raises():
    from workbench.norms import register

    with pytest.raises(ValueError, match="twice"):
        register(get_scheme("pre-ln"))


@pytest.mark.parametrize("norm,layer", [("pre-ln", 0), ("lns", 2), ("pre-rms", 0), ("pre-crms", 0), ("srms", 0)])
def test_observed_and_fused_paths_agree(x, norm, layer):
    """With a hook on hook_scale the norm runs its written-out formula; unobserved it may use a fused
    kernel. Both must give the same output, and the hook must see the per-token scale."""
    m = make(norm, layer=layer); randomize_affine(m)
    fast = m(x)
    seen = {}
    m.hook_scale.add_hook(lambda t, hook: seen.setdefault("scale", t))
    slow = m(x)
    m.hook_scale.remove_hooks()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert seen["scale"].shape == (3, 5, 1)


@pytest.mark.parametrize("norm", ["pre-ln", "pre-rms"])
def test_a_hook_that_replaces_the_scale_takes_effect(x, norm):
    """Freezing the scale through hook_scale (what LayerNorm removal does) changes the output to
    standardize-with-that-scale, on the fast path too."""
    m = make(norm); randomize_affine(m)
    frozen = torch.full((3, 5, 1), 2.5)
    m.hook_scale.add_hook(lambda t, hook: frozen)
    y = m(x)
    m.hook_scale.remove_hooks()
    centered = x - x.mean(-1, keepdim=True) if norm == "pre-ln" else x
    expected = centered / 2.5 * m.affine.w + (m.affine.b if m.affine.b is not None else 0)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
