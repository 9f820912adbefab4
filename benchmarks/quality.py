"""Does `quality` rank SAEs the way ground-truth dictionary recovery does?

For each synthetic setting (a shard set with a known dictionary, `saev_jax.synthetic`), train
one sweep of SAEs over sparsity coefficient x learning rate as one stack (`training.train_step`),
evaluate it in one pass (`evaluation.accumulate`, as `evaluate()` does), and compare, by Spearman correlation,
the ranking of every candidate score with the ranking by recovery = mean over true directions
of the max |cosine| with a decoder row.

    python benchmarks/quality.py [--settings A B C D] [--out benchmarks/results/quality] [--figs docs]

Writes `<out>.json` (every SAE's metrics and scores) and `<out>.md` (the tables), and the
figures `docs/sweep_<setting>.png`, `docs/sae_<setting>_{best,worst}.png` (`--figs`).
All four settings took 19 min 20 s of wall time on 2 CPU cores shared with other jobs
(2-5 min of training and 1-2 min of evaluation per setting). Results: docs/quality.md.
"""

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from saev_jax import config, data, evaluation, plan, plots, step, synthetic, training
from saev_jax import quality as quality_lib
from saev_jax import sae as sae_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `python benchmarks/quality.py` as well as -m
from benchmarks import harness  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    """One synthetic data set and the sweep trained on it."""

    name: str
    synth: synthetic.Synthetic
    exp_factor: int = 8
    n_patches: int = 2_000_000
    batch_size: int = 1024
    sparsity_coeffs: tuple[float, ...] = (0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256)
    lrs: tuple[float, ...] = (1e-3, 4e-3, 1.6e-2)


def _synth(**kw) -> synthetic.Synthetic:
    return synthetic.Synthetic(**({"n_imgs": 4096, "n_patches_per_img": 64, "layers": (-2,)} | kw))


SETTINGS = {
    "A": Setting("A", _synth(d_vit=32, n_features=128, k=4, noise=0.05, seed=1)),
    # Wider and denser; the SAE is exactly as wide as the true dictionary.
    "B": Setting("B", _synth(d_vit=64, n_features=256, k=8, noise=0.05, seed=2), exp_factor=4),
    # A's shape with six times the noise.
    "C": Setting("C", _synth(d_vit=32, n_features=128, k=4, noise=0.3, seed=3)),
    # Very sparse (k=2) over twice as many true features, flatter frequencies (Zipf 0.5), noise 0.1.
    "D": Setting("D", _synth(d_vit=32, n_features=256, k=2, noise=0.1, zipf_exponent=0.5, seed=4)),
}


def recovery(w_dec_SD: np.ndarray, truth_FD: np.ndarray) -> float:
    """Mean over true directions of the max |cosine| with any decoder row."""
    w = w_dec_SD / np.maximum(np.linalg.norm(w_dec_SD, axis=1, keepdims=True), 1e-12)
    t = truth_FD / np.linalg.norm(truth_FD, axis=1, keepdims=True)
    return float(np.abs(t @ w.T).max(axis=1).mean())


def run_setting(
    setting: Setting,
    root: pathlib.Path,
    fig_dpath: pathlib.Path | None,
    save_dpath: pathlib.Path | None = None,
    load_dpath: pathlib.Path | None = None,
    quality_stride: int | None = None,
) -> tuple[list[dict], dict]:
    """Trains (or loads) and evaluates the sweep of one setting; one row of scores per SAE, and timings."""
    shard_dpath = root / setting.name
    t0 = time.perf_counter()
    synthetic.write_shards(shard_dpath, setting.synth)
    truth = np.load(shard_dpath / "truth.npy")
    data_cfg = config.DataLoad(shard_root=str(shard_dpath), patches="patches", layer=setting.synth.layers[0])
    acts = data.Activations(data_cfg)
    preprocess = data.make_preprocess(acts, data_cfg)
    x_ND = acts.read(np.arange(len(acts)))
    t_data = time.perf_counter() - t0

    sae_cfg = config.SparseAutoencoder(d_vit=setting.synth.d_vit, exp_factor=setting.exp_factor, n_reinit_samples=0)
    base = config.Train(
        data=data_cfg,
        sae=sae_cfg,
        n_patches=setting.n_patches,
        sae_batch_size=setting.batch_size,
        n_lr_warmup=100,
        track=False,
    )
    cfgs = config.grid(base, {"lr": list(setting.lrs), "sae": {"sparsity_coeff": list(setting.sparsity_coeffs)}})
    mesh = plan.make_mesh(jax.devices()[:1])
    state, hparams = step.init_single(sae_lib.make_saes([c.sae for c in cfgs]), step.Hparams.from_cfgs(cfgs), mesh)
    # b_dec starts at the data mean (SPEC 3), here of the whole set.
    whole = [dataclasses.replace(c, sae=dataclasses.replace(c.sae, n_reinit_samples=len(acts))) for c in cfgs]
    state = eqx.tree_at(
        lambda s: s.stacks, state, tuple(training.init_b_dec(list(state.stacks), [whole], acts, preprocess))
    )

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    B, n_steps = setting.batch_size, training.n_train_steps(base)
    loaded = load_dpath / f"saes_{setting.name}.npz" if load_dpath is not None else None
    if loaded is not None and loaded.exists():  # The SAEs of an earlier run (--save-saes): evaluation only.
        tensors = np.load(loaded)
        saes = eqx.tree_at(
            lambda s: tuple(getattr(s, k) for k in sae_lib.TENSOR_NAMES),
            state.stacks[0].saes,
            tuple(jnp.asarray(tensors[k]) for k in sae_lib.TENSOR_NAMES),
        )
        state = eqx.tree_at(lambda s: s.stacks[0].saes, state, saes)
        n_steps = 0
    order = np.concatenate(
        [rng.permutation(len(acts)) for _ in range(-(-n_steps * B // len(acts)))] or [np.zeros(0, int)]
    )
    for i in range(n_steps):
        x_BD = jnp.asarray(x_ND[order[i * B : (i + 1) * B]])
        state, _ = step.train_step(state, hparams, preprocess, x_BD, chunks=(len(cfgs),), mesh=mesh)
    jax.block_until_ready(state)
    t_train = time.perf_counter() - t0
    if save_dpath is not None and n_steps:
        save_dpath.mkdir(parents=True, exist_ok=True)
        np.savez(
            save_dpath / f"saes_{setting.name}.npz",
            **{k: np.asarray(getattr(state.stacks[0].saes, k)) for k in sae_lib.TENSOR_NAMES},
        )

    t0 = time.perf_counter()
    n = len(acts)

    def batches():
        for start in range(0, n, B):
            x = x_ND[start : start + B]
            yield jnp.asarray(np.pad(x, ((0, B - len(x)), (0, 0)))), len(x)

    stride = evaluation.quality_stride(n, B) if quality_stride is None else quality_stride
    stats = evaluation.accumulate(state.stacks[0].saes, batches(), preprocess, quality_stride=stride)
    results = evaluation.metrics_from_stats(stats)
    t_eval = time.perf_counter() - t0
    print(
        f"{setting.name}: data {t_data:.0f}s, train {len(cfgs)} SAEs x {n_steps} steps {t_train:.0f}s, eval {t_eval:.0f}s",
        file=sys.stderr,
    )

    if fig_dpath is not None:
        labels = [plots.label(c) for c in cfgs]
        title = f"setting {setting.name}: d_vit={setting.synth.d_vit}, {setting.synth.n_features} true features, k={setting.synth.k:g}, noise={setting.synth.noise:g}"
        plots.save_figure(plots.plot_group(results, labels, title), fig_dpath / f"sweep_{setting.name}.png")
        recs = [recovery(np.asarray(state.stacks[0].saes.W_dec[m]), truth) for m in range(len(cfgs))]
        for tag, m in (("best", int(np.argmax(recs))), ("worst", int(np.argmin(recs)))):
            plots.save_figure(
                plots.plot_sae(
                    results[m], f"setting {setting.name}, {labels[m]}, recovery {recs[m]:.2f} ({tag} of the sweep)"
                ),
                fig_dpath / f"sae_{setting.name}_{tag}.png",
            )

    rows = []
    for m, (cfg, r) in enumerate(zip(cfgs, results)):
        rows.append(dict(
            setting=setting.name, lr=cfg.lr, sparsity_coeff=cfg.sae.sparsity_coeff,
            recovery=recovery(np.asarray(state.stacks[0].saes.W_dec[m]), truth),
            mse=r.mse, l0=r.l0, l1=r.l1, n_dead=r.n_dead, n_dense=r.n_dense, d_sae=cfg.sae.d_sae,
        ) | scores(stats, m, r))  # fmt: skip
    return rows, dict(
        data_s=t_data,
        train_s=t_train,
        eval_s=t_eval,
        n_examples=n,
        n_steps=n_steps,
        n_saes=len(cfgs),
        quality_stride=stride,
        quality_examples=stats.code_n,
    )


def scores(stats: evaluation.PassStats, m: int, r: evaluation.EvalMetrics) -> dict[str, float]:
    """Every candidate score of SAE m, oriented so that higher should be better."""
    n, d = stats.n, stats.d_vit
    freqs, norms = stats.n_fired[m] / n, stats.w_dec_norms[m]
    levels = evaluation.code_bits(stats, m)
    best = int(np.argmax([b.quality for b in levels]))
    as_is = levels[0]  # debiased, not pruned
    no_debias = quality_lib.description_bits(freqs, r.mean_values, r.mse, stats.data_var, d, norms)
    scale, shift, sq_err = quality_lib.debias(stats.code_sq_err[m, 0], stats.code_gram[m, 0], stats.code_cross[m, 0])
    # The value code at a fixed resolution (1/256 of the data's standard deviation) instead of sqrt(12 MSE).
    step = np.sqrt(stats.data_var) / 256
    vals = np.abs(np.nan_to_num(scale * r.mean_values + shift) * norms)
    fixed_value_bits = float(np.sum(freqs * np.maximum(np.log2(np.e * np.maximum(vals, 1e-30) / step), 0)))
    return {
        "quality": r.quality,
        "quality_stderr": r.quality_stderr,
        "mdl_no_pruning": as_is.quality,
        "mdl_no_pruning_no_debias": no_debias.quality,
        "mdl_no_pruning_fixed_resolution": as_is.residual_saved - as_is.support - fixed_value_bits,
        "neg_mse": -r.mse,
        "neg_mse_debiased": -sq_err / (stats.code_n * d),
        "neg_l0": -r.l0,
        "neg_frac_dead": -r.n_dead / len(freqs),
        "neg_n_dense": -float(r.n_dense),
        "neg_support_bits": -as_is.support,
        "best_level": quality_lib.PRUNE_LEVELS[best],
        "residual_bits_saved": levels[best].residual_saved,
        "support_bits": levels[best].support,
        "value_bits": levels[best].values,
    }


SCORES = (
    "quality", "mdl_no_pruning", "mdl_no_pruning_no_debias", "mdl_no_pruning_fixed_resolution",
    "neg_mse", "neg_mse_debiased", "neg_l0", "neg_frac_dead", "neg_n_dense", "neg_support_bits",
)  # fmt: skip


def spearman(a, b) -> float:
    rho = scipy.stats.spearmanr(a, b)[0]
    return float(rho) if np.isfinite(rho) else float("nan")


def report(rows: list[dict], timings: dict[str, dict], settings: list[Setting]) -> str:
    """The markdown tables: settings, Spearman of every score with recovery, the pick of each score."""
    names = [st.name for st in settings]
    lines = harness.table(
        ["setting", "d_vit", "true features", "k", "noise", "d_sae", "SAEs", "examples", "steps", "train s", "eval s"],
        [[st.name, st.synth.d_vit, st.synth.n_features, f"{st.synth.k:g}", f"{st.synth.noise:g}", st.synth.d_vit * st.exp_factor,
          t["n_saes"], t["n_examples"], t["n_steps"], f"{t['train_s']:.0f}", f"{t['eval_s']:.0f}"]
         for st, t in ((st, timings[st.name]) for st in settings)],
    )  # fmt: skip
    lines += ["", "Spearman correlation with recovery (higher is better):", ""]
    spearman_rows = []
    for score in SCORES:
        rhos = [
            spearman(
                [r["recovery"] for r in rows if r["setting"] == st.name],
                [r[score] for r in rows if r["setting"] == st.name],
            )
            for st in settings
        ]
        spearman_rows.append([score, *(f"{x:+.2f}" for x in rhos), f"{np.nanmean(rhos):+.2f}"])
    lines += harness.table(["score", *names, "mean"], spearman_rows)
    lines += ["", "Recovery of the SAE each score picks (best possible in brackets):", ""]
    pick_rows = []
    for score in SCORES:
        cells = []
        for st in settings:
            rs = [r for r in rows if r["setting"] == st.name]
            pick = max(rs, key=lambda r: r[score])
            cells.append(f"{pick['recovery']:.3f} ({max(r['recovery'] for r in rs):.3f})")
        pick_rows.append([score, *cells])
    lines += harness.table(["score", *names], pick_rows)
    for st in settings:
        lines += ["", f"Setting {st.name}, every SAE:", ""]
        lines += harness.table(
            ["lr", "λ", "recovery", "quality", "best level", "bits: residual saved / support / values", "L0", "MSE", "dead", "dense"],
            [[f"{r['lr']:g}", f"{r['sparsity_coeff']:g}", f"{r['recovery']:.3f}", f"{r['quality']:.1f}", f"{r['best_level']:g}",
              f"{r['residual_bits_saved']:.1f} / {r['support_bits']:.1f} / {r['value_bits']:.1f}", f"{r['l0']:.1f}",
              f"{r['mse']:.4f}", r["n_dead"], r["n_dense"]] for r in rows if r["setting"] == st.name],
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default="benchmarks/results/quality", help="writes OUT.json and OUT.md")
    parser.add_argument(
        "--save-saes", default="", help="directory to save each sweep's trained SAEs in (saes_<setting>.npz)"
    )
    parser.add_argument(
        "--load-saes",
        default="",
        help="evaluate the SAEs saved there by --save-saes instead of training (where present)",
    )
    parser.add_argument(
        "--quality-stride",
        type=int,
        default=None,
        help="sample every this many examples for quality (default: evaluation.quality_stride)",
    )
    parser.add_argument(
        "--figs", default="docs", help="where sweep_<setting>.png and sae_<setting>_{best,worst}.png go ('' for none)"
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows, timings = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            setting_rows, timings[name] = run_setting(
                SETTINGS[name],
                pathlib.Path(tmp),
                pathlib.Path(args.figs) if args.figs else None,
                pathlib.Path(args.save_saes) if args.save_saes else None,
                pathlib.Path(args.load_saes) if args.load_saes else None,
                args.quality_stride,
            )
            rows += setting_rows
    settings = [SETTINGS[name] for name in args.settings]
    md = report(rows, timings, settings) + f"\nTotal wall time: {time.perf_counter() - t0:.0f} s.\n"
    harness.write(
        args.out, dict(settings={st.name: dataclasses.asdict(st) for st in settings}, timings=timings, rows=rows), md
    )


if __name__ == "__main__":
    main()
