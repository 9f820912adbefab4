"""A plain NumPy (float64) reference of one SAE's forward pass, gradients and training step.

Written from SPEC 3 with hand-derived gradients, independent of JAX and of saev_jax.
"""

import numpy as np


def forward(p, x):
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = np.maximum(z, 0.0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    return z, f, x_hat


def loss_and_grads(p, x, coeff):
    """Loss terms and the gradient of `mse + coeff * l1` with respect to every parameter."""
    B, D = x.shape
    z, f, x_hat = forward(p, x)
    mse = np.mean((x_hat - x) ** 2)
    l1 = np.mean(f.sum(axis=1))
    l0 = np.mean((f > 0).sum(axis=1))
    terms = {"mse": mse, "l1": l1, "l0": l0, "sparsity": coeff * l1, "loss": mse + coeff * l1}

    g_xhat = 2 * (x_hat - x) / (B * D)
    g_f = g_xhat @ p["W_dec"].T + coeff / B
    g_z = g_f * (z > 0)
    grads = {
        "W_dec": f.T @ g_xhat,
        "W_enc": (x - p["b_dec"]).T @ g_z,
        "b_enc": g_z.sum(axis=0),
        "b_dec": g_xhat.sum(axis=0) - (g_z @ p["W_enc"].T).sum(axis=0),
    }
    return terms, grads


def warmup(peak, n, t):
    return peak * min(t / n, 1.0) if n > 0 else peak


def kaiming_bound(n):
    return np.sqrt(6 / n)


class SAETrainer:
    """One SAE trained by SPEC 3's steps with Adam (betas 0.9/0.999, eps 1e-8), written plainly."""

    def __init__(self, params, *, lr, n_lr_warmup, coeff, n_coeff_warmup, normalize, remove_parallel):
        self.p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.t = 0
        self.lr, self.n_lr_warmup = lr, n_lr_warmup
        self.coeff, self.n_coeff_warmup = coeff, n_coeff_warmup
        self.normalize, self.remove_parallel = normalize, remove_parallel

    def step(self, x):
        p = self.p
        if self.normalize:
            p["W_dec"] = p["W_dec"] / np.linalg.norm(p["W_dec"], axis=1, keepdims=True)
        coeff = warmup(self.coeff, self.n_coeff_warmup, self.t)
        lr = warmup(self.lr, self.n_lr_warmup, self.t)
        terms, g = loss_and_grads(p, x, coeff)
        if self.remove_parallel:
            W = p["W_dec"]
            g["W_dec"] = g["W_dec"] - (np.sum(g["W_dec"] * W, axis=1) / np.sum(W * W, axis=1))[:, None] * W
        self.t += 1
        for k in p:
            self.m[k] = 0.9 * self.m[k] + 0.1 * g[k]
            self.v[k] = 0.999 * self.v[k] + 0.001 * g[k] ** 2
            m_hat = self.m[k] / (1 - 0.9**self.t)
            v_hat = self.v[k] / (1 - 0.999**self.t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        return terms | {"learning_rate": lr, "sparsity_coeff": coeff}
