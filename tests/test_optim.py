"""The optimizer rule against AdamW written out, and a resumed optimizer keeping its fused kernel."""

import copy

import torch

from workbench.config import ModelConfig
from workbench.model import GPT
from workbench.optim import adamw, decays, fusable, load_state


def _model() -> GPT:
    torch.manual_seed(3)
    m = GPT(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=64, n_ctx=8))
    with torch.no_grad():
        for p in m.parameters():  # norm gains and biases away from 1 and 0
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _grads(m: GPT, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_two_steps_equal_adamw_written_out():
    """Decoupled weight decay on W_* only, bias-corrected moments, betas (0.9, 0.95): two steps by hand."""
    m = _model()
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.95), 1e-8
    opt = adamw(m, lr, wd, (b1, b2))
    assert opt.param_groups[0]["fused"] is True  # plain CPU float tensors: the fused kernel
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    mom = {n: torch.zeros_like(p) for n, p in ref.items()}
    var = {n: torch.zeros_like(p) for n, p in ref.items()}
    for t in (1, 2):
        _grads(m, seed=t)
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        for n, p in ref.items():
            mom[n] = b1 * mom[n] + (1 - b1) * grads[n]
            var[n] = b2 * var[n] + (1 - b2) * grads[n] ** 2
            m_hat, v_hat = mom[n] / (1 - b1 ** t), var[n] / (1 - b2 ** t)
            decayed = p * (1 - lr * wd) if decays(n) else p
            ref[n] = decayed - lr * m_hat / (v_hat.sqrt() + eps)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-6, atol=1e-7, msg=n)


def test_a_resume_from_a_per_tensor_checkpoint_keeps_the_fused_kernel_and_the_state():
    """torch's load_state_dict takes the saved groups' implementation keys; load_state keeps ours, and the
    resumed fused optimizer then steps like the per-tensor one it was saved from."""
    a, b = _model(), _model()
    per_tensor = torch.optim.AdamW(adamw(a, 1e-2, 0.1, (0.9, 0.95)).param_groups, foreach=False)
    for group in per_tensor.param_groups:
        group["fused"] = None
    _grads(a, seed=1)
    per_tensor.step()
    b.load_state_dict(a.state_dict())
    resumed = adamw(b, 1e-2, 0.1, (0.9, 0.95))
    # a copy, as a checkpoint file gives: torch shares the saved step tensors with the optimizer that saved them
    load_state(resumed, copy.deepcopy(per_tensor.state_dict()))
    assert all(g["fused"] is True for g in resumed.param_groups)
    _grads(a, seed=2), _grads(b, seed=2)
    per_tensor.step(), resumed.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7, msg=n)


def test_only_plain_float_tensors_on_cpu_or_cuda_are_fusable():
    assert fusable([torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)])
    assert not fusable([]) and not fusable([torch.zeros(2, dtype=torch.int64)])
    assert not fusable([torch.zeros(2, device="meta")])
