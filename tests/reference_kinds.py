"""The SAE kinds written plainly in PyTorch (float64) from the papers' equations, for tests.

Independent of JAX and of saev_jax: selection by `torch.topk` and scatter, Matryoshka prefixes
as explicit slices, JumpReLU's pseudo-derivatives as `torch.autograd.Function`s, AuxK as in
Gao et al. appendix A.2. Gradients come from torch's autograd.
"""

import numpy as np
import torch

NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def params(p: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in p.items()}


def pre_acts(p, x):
    return (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]


def fvu(x_hat, x):
    return ((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def topk_acts(h, k):
    """Gao: the k largest pre-activations of each row, ReLU'd, scattered back."""
    vals, idx = torch.topk(h, k, dim=-1)
    return torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))


def batchtopk_acts(h, k):
    """Bussmann: the k * B largest of relu(h) over the flattened batch."""
    a = torch.relu(h).flatten()
    vals, idx = torch.topk(a, k * h.shape[0])
    return torch.zeros_like(a).scatter(0, idx, vals).reshape(h.shape)


def auxk(h, dead, residual, W_dec, k_aux):
    """Gao A.2: top-k_aux of the dead latents' pre-activations, ReLU'd, decode without b_dec;
    ||e_hat - e||^2 summed over the batch, over the same sum for e - mean(e); e detached."""
    if not dead.any():
        return torch.zeros((), dtype=h.dtype)
    masked = torch.where(dead, h, torch.tensor(-torch.inf, dtype=h.dtype))
    kk = min(k_aux, int(dead.sum()))
    vals, idx = torch.topk(masked, kk, dim=-1)
    a = torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
    e = residual.detach()
    e_hat = a @ W_dec
    return ((e_hat - e) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()


def topk_family(p, x, f, x_hat, recon, dead, k_aux, alpha):
    aux = auxk(pre_acts(p, x), dead, x - x_hat, p["W_dec"], k_aux)
    return recon + alpha * aux, aux


def loss_and_grads(kind: str, p_np, x_np, **hp):
    """`(total loss, aux loss or None, activations, {name: grad})` of one SAE of `kind` on a batch."""
    p = params(p_np)
    x = torch.tensor(np.asarray(x_np, np.float64))
    h = pre_acts(p, x)
    aux = None
    if kind in ("topk", "batchtopk", "matryoshka"):
        f = topk_acts(h, hp["k"]) if kind == "topk" else batchtopk_acts(h, hp["k"])
        x_hat = f @ p["W_dec"] + p["b_dec"]
        if kind == "matryoshka":
            widths = hp["widths"]
            recon = sum(fvu(f[:, :m] @ p["W_dec"][:m] + p["b_dec"], x) for m in widths) / len(widths)
        else:
            recon = fvu(x_hat, x)
        dead = torch.tensor(np.asarray(hp["dead"]))
        total, aux = topk_family(p, x, f, x_hat, recon, dead, hp["k_aux"], hp["alpha"])
    elif kind == "jumprelu":
        theta = torch.exp(p["log_threshold"])
        f = JumpReLU.apply(h, theta, hp["eps"])
        x_hat = f @ p["W_dec"] + p["b_dec"]
        l0 = Step.apply(h, theta, hp["eps"]).sum(1).mean()
        total = fvu(x_hat, x) + hp["coeff"] * l0
    else:
        raise ValueError(kind)
    total.backward()
    grads = {k: v.grad.numpy() for k, v in p.items()}
    return total.item(), None if aux is None else aux.item(), f.detach().numpy(), grads


def rect(u):
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """Rajamanoharan et al.: h * H(h - theta); d/dh = H(h - theta); d/dtheta = -(theta/eps) K((h - theta)/eps)."""

    @staticmethod
    def forward(ctx, h, theta, eps):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return h * (h > theta)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        d_theta = (-(theta / ctx.eps) * rect((h - theta) / ctx.eps) * g).sum(0)
        return (h > theta) * g, d_theta, None


class Step(torch.autograd.Function):
    """H(h - theta); d/dh = 0; d/dtheta = -(1/eps) K((h - theta)/eps)."""

    @staticmethod
    def forward(ctx, h, theta, eps):
        ctx.save_for_backward(h, theta)
        ctx.eps = eps
        return (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, theta = ctx.saved_tensors
        d_theta = (-(1 / ctx.eps) * rect((h - theta) / ctx.eps) * g).sum(0)
        return torch.zeros_like(h), d_theta, None
