"""One number for how good an SAE is: the bits per example it saves when used as a code.

Read `docs/quality.md` for the reasoning. In short, transmit each example through the SAE
(which features fire, their values, the residual) and compare with sending it raw. Every
term uses only what evaluation measures: feature frequencies, mean values, MSE, the data's
variance and the decoder's row norms. Nothing is fitted: the one resolution in the code (the
precision of a transmitted value) is the one that minimises the code length.

    quality = (d/2) log2(1 / FVU)                         residual: bits saved versus raw
              - sum_j H_b(p_j)                            which features fire
              - sum_j p_j [H_geo(mu_j / Delta) + log2(e)/2]   their values, at Delta = sqrt(12 MSE)

All terms are per example; higher is better; 0 means no better than sending the data raw.
"""

import dataclasses
import math

import numpy as np
from jaxtyping import Float

LOG2E = math.log2(math.e)
PRUNE_LEVELS = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0)
"""The codes built from one SAE: level c sends feature j of example x only when
f_j * |W_dec row j| > c * rms(x). Level 0 is the SAE as it is. `quality` is the best of them
(a doubling grid, not fitted: choosing one of 7 codes costs log2(7) bits once, not per example)."""


@dataclasses.dataclass(frozen=True)
class Bits:
    """The terms of the description length of one example sent through an SAE, in bits."""

    residual_saved: float
    """(d/2) log2(1/FVU): what the reconstruction saves on the residual versus sending x raw."""
    support: float
    """sum_j H_b(freq_j): which features fire (each feature coded independently)."""
    values: float
    """sum_j freq_j * (bits of one value of feature j at resolution sqrt(12 MSE), plus its distortion)."""

    @property
    def quality(self) -> float:
        """Bits saved per example versus the raw data: residual_saved - support - values."""
        return self.residual_saved - self.support - self.values


def binary_entropy(p: Float[np.ndarray, "..."]) -> Float[np.ndarray, "..."]:
    """H_b(p) in bits, 0 at p = 0 and p = 1."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.where((p > 0) & (p < 1), h, 0.0)


def geometric_entropy(ratio: Float[np.ndarray, "..."]) -> Float[np.ndarray, "..."]:
    """Entropy in bits of an exponential variable of mean `ratio * Delta` quantised with step Delta.

    The quantised exponential is geometric with q = exp(-1/ratio): H = H_b(q) / (1 - q). It
    tends to log2(e * ratio) for large ratios and to 0 as the ratio goes to 0.
    """
    ratio = np.asarray(ratio, np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        q = np.exp(-1.0 / np.maximum(ratio, 1e-300))
    return np.where(ratio > 0, binary_entropy(q) / np.maximum(1 - q, 1e-300), 0.0)


def description_bits(
    freqs: Float[np.ndarray, " d_sae"],
    mean_values: Float[np.ndarray, " d_sae"],
    mse: float,
    data_var: float,
    d_vit: int,
    w_dec_norms: Float[np.ndarray, " d_sae"] | None = None,
) -> Bits:
    """The description-length terms of one SAE from its evaluation statistics.

    Args:
        freqs: fraction of examples on which each feature fired.
        mean_values: mean value of each feature when it fired (NaN or anything where freq is 0).
        mse: mean over examples and dimensions of the squared reconstruction error.
        data_var: mean over dimensions of the variance of the (preprocessed) data; the raw code
            sends each dimension with a Gaussian of this variance. Not positive: every term is NaN.
        d_vit: dimension of an example.
        w_dec_norms: L2 norm of each decoder row (a value v of feature j moves x by v * norm_j);
            None means unit rows.

    The residual and the raw data are both coded as isotropic Gaussians at the same fine
    resolution, so that resolution cancels and the saving is (d/2) log2(data_var / mse). A
    feature value is modelled as exponential with the measured mean (the maximum-entropy law for
    a positive value of known mean, so these are upper bounds) and sent with step
    Delta = sqrt(12 mse), the step at which one more bit of value precision would save one bit
    of residual; its quantisation noise (Delta^2 / 12 along a unit direction) costs log2(e)/2
    more residual bits. Dead features cost nothing.
    """
    freqs = np.asarray(freqs, np.float64)
    values = np.nan_to_num(np.asarray(mean_values, np.float64), nan=0.0)
    if w_dec_norms is not None:
        values = values * np.asarray(w_dec_norms, np.float64)
    mse, data_var = float(mse), float(data_var)
    if not (
        data_var > 0
    ):  # Constant data: nothing to code, no meaningful number (but no crash at the end of training).
        return Bits(residual_saved=math.nan, support=math.nan, values=math.nan)
    mse = max(mse, data_var * 1e-12)  # A perfect reconstruction of finite-precision data.
    residual_saved = 0.5 * d_vit * math.log2(data_var / mse)
    support = float(binary_entropy(freqs).sum())
    delta = math.sqrt(12.0 * mse)
    per_value = geometric_entropy(np.abs(values) / delta) + LOG2E / 2
    value_bits = float(np.sum(np.where(freqs > 0, freqs * per_value, 0.0)))
    return Bits(residual_saved=residual_saved, support=support, values=value_bits)


def debias(sq_err: float, gram: Float[np.ndarray, " 3"], cross: Float[np.ndarray, " 2"]) -> tuple[float, float, float]:
    """The least-squares correction of the active values, shared by all features of one SAE.

    With z = f @ W_dec, u = 1[f > 0] @ W_dec and e = x - x_hat summed over a pass as
    gram = (z.z, z.u, u.u) and cross = (e.z, e.u), the reconstruction
    b_dec + (scale * f + shift * 1[f > 0]) @ W_dec with the best (scale, shift) has the returned
    squared error (a sum, like `sq_err`). An L1 penalty shrinks every active value by about the
    same amount (soft thresholding), so `shift` undoes most of that known bias; the decoder,
    the encoder's choice of active features and everything else stay as trained.
    Returns (scale, shift, debiased sq_err).
    """
    zz, zu, uu = (float(v) for v in gram)
    ez, eu = (float(v) for v in cross)
    G = np.array([[zz, zu], [zu, uu]])
    g = np.array([ez, eu])
    coef = np.linalg.lstsq(G, g, rcond=1e-10)[0] if np.any(G) else np.zeros(2)
    improvement = max(float(g @ coef), 0.0)
    return 1.0 + float(coef[0]), float(coef[1]), max(float(sq_err) - improvement, 0.0)


def quality(
    freqs: Float[np.ndarray, " d_sae"],
    mean_values: Float[np.ndarray, " d_sae"],
    mse: float,
    data_var: float,
    d_vit: int,
    w_dec_norms: Float[np.ndarray, " d_sae"] | None = None,
) -> float:
    """Bits per example saved by coding the data through the SAE instead of raw; higher is better.

    See `description_bits` for the arguments and the code.
    """
    return description_bits(freqs, mean_values, mse, data_var, d_vit, w_dec_norms).quality
