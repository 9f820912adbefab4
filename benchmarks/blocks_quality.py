"""Does the `blocks` read mode train SAEs as well as the full permutation? On the adversarial case.

    python benchmarks/blocks_quality.py [--out benchmarks/results/blocks-quality]

A synthetic shard set written in class order: 32 classes of 256 images (64 patches + [CLS],
d_vit 64), each class using only its own 8 of 256 dictionary directions, images sorted by
class, so a reader that keeps neighbouring images together sees few classes at a time. The
same stack of SAEs (exp 8, sparsity coefficients x learning rates) trains three times on
the same number of examples, batches from `data.Loader`:

- `random`: the full per-epoch permutation (the reference);
- `blocks`: blocks of 4 images (as 4 MiB blocks at d_vit 1024), windows of 512, 1024 and
  2048 images (1/16, 1/8, 1/4 of the set);
- `random` with another seed: the spread that the seed alone gives;
- `ordered`: no shuffling at all (class after class), a control that shows the set is adversarial.

Each is evaluated on the whole set in one ordered pass (`evaluation.accumulate`). The claim is
that `blocks` matches `random` within +-2% in eval MSE and L0 for every SAE.
"""

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from saev_jax import config, data, evaluation, plan, step
from saev_jax import sae as sae_lib

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1])
)  # `python benchmarks/blocks_quality.py` as well as -m
from benchmarks import harness  # noqa: E402

D_VIT, N_CLASSES, IMGS_PER_CLASS, N_PATCHES, FEATS_PER_CLASS = 64, 32, 256, 64, 8


def write_class_ordered(dpath: pathlib.Path) -> data.Metadata:
    """Shards whose images come class after class; a class's tokens use only its own directions."""
    rng = np.random.default_rng(0)
    n_feat = N_CLASSES * FEATS_PER_CLASS
    truth = rng.normal(size=(n_feat, D_VIT)).astype(np.float32)
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    n_imgs, n_tokens = N_CLASSES * IMGS_PER_CLASS, N_PATCHES + 1
    md = data.Metadata("synthetic", "class-ordered", (0,), N_PATCHES, True, D_VIT, 0, n_imgs, 512 * n_tokens,
                       "class-ordered synthetic (benchmarks/blocks_quality.py)")  # fmt: skip
    acts = np.zeros((md.n_shards * md.n_imgs_per_shard, 1, n_tokens, D_VIT), np.float32)
    for c in range(N_CLASSES):
        n_tok = IMGS_PER_CLASS * n_tokens
        codes = np.zeros((n_tok, FEATS_PER_CLASS), np.float32)
        active = rng.random((n_tok, FEATS_PER_CLASS)) < 4 / FEATS_PER_CLASS  # ~4 active per token
        codes[active] = rng.lognormal(0.0, 0.5, active.sum())
        x = codes @ truth[c * FEATS_PER_CLASS : (c + 1) * FEATS_PER_CLASS] + rng.normal(0, 0.05, (n_tok, D_VIT))
        acts[c * IMGS_PER_CLASS : (c + 1) * IMGS_PER_CLASS, 0] = x.reshape(IMGS_PER_CLASS, n_tokens, D_VIT)
    dpath.mkdir(parents=True, exist_ok=True)
    for s in range(md.n_shards):
        acts[s * md.n_imgs_per_shard : (s + 1) * md.n_imgs_per_shard].tofile(dpath / data.shard_fname(s))
    md.dump(dpath)
    return md


def train_and_eval(
    mode: str, acts, preprocess, cfgs, n_steps: int, B: int, window_imgs: int = 512, seed: int = 0
) -> list[dict]:
    mesh = plan.make_mesh(jax.devices()[:1])
    state, hparams = step.init_single(sae_lib.make_saes([c.sae for c in cfgs]), step.Hparams.from_cfgs(cfgs), mesh)
    image_bytes = acts.image_read_nbytes
    if mode == "ordered":

        def stream():
            while True:
                yield from data.Loader(acts, batch_size=B, shuffle=False, read_mode="random")

        batches = stream()
    else:
        window_bytes = window_imgs * acts.examples_per_image * acts.d_vit * 4
        batches = iter(data.Loader(acts, batch_size=B, shuffle=True, seed=seed, read_mode=mode,
                                   block_bytes=4 * image_bytes, shuffle_buffer_bytes=2 * window_bytes))  # fmt: skip
    t0 = time.perf_counter()
    for _ in range(n_steps):
        x_BD, _ = next(batches)
        state, _ = step.train_step(state, hparams, preprocess, x_BD, chunks=(len(cfgs),), mesh=mesh)
    jax.block_until_ready(state)
    print(f"{mode}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    if hasattr(batches, "close"):
        batches.close()
    n = len(acts)
    x_ND = acts.read(np.arange(n))

    def eval_batches():
        for start in range(0, n, B):
            x = x_ND[start : start + B]
            yield jnp.asarray(np.pad(x, ((0, B - len(x)), (0, 0)))), len(x)

    # quality (not reported here) costs extra decoder products per batch: take it on one batch only.
    stats = evaluation.accumulate(state.stacks[0].saes, eval_batches(), preprocess, quality_stride=10**9)
    results = evaluation.metrics_from_stats(stats)
    name = {"blocks": f"blocks, {window_imgs}-image windows", "random": f"random, seed {seed}"}.get(mode, mode)
    return [dict(mode=name, lr=c.lr, sparsity_coeff=c.sae.sparsity_coeff, mse=r.mse, l0=r.l0, n_dead=r.n_dead)
            for c, r in zip(cfgs, results)]  # fmt: skip


def class_mix(acts, B: int) -> dict:
    """Distinct classes and images per batch, over 20 batches, of each shuffled mode."""
    out = {}
    for mode in ("random", "blocks"):
        window_bytes = 512 * acts.examples_per_image * acts.d_vit * 4
        loader = data.Loader(acts, batch_size=B, shuffle=True, seed=0, read_mode=mode,
                             block_bytes=4 * acts.image_read_nbytes, shuffle_buffer_bytes=2 * window_bytes)  # fmt: skip
        img = [acts.image_i(loader.batch_indices(b)) for b in range(20)]
        out[mode] = {"classes_per_batch": float(np.mean([np.unique(i // IMGS_PER_CLASS).size for i in img])),
                     "images_per_batch": float(np.mean([np.unique(i).size for i in img]))}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/blocks-quality")
    parser.add_argument("--n-steps", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--window-imgs", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train ordered, and random with another seed",
    )
    args = parser.parse_args()
    dpath = pathlib.Path(tempfile.mkdtemp(prefix="blocks-quality-"))
    write_class_ordered(dpath)
    data_cfg = config.DataLoad(shard_root=str(dpath), layer=0)
    acts = data.Activations(data_cfg)
    preprocess = data.make_preprocess(acts, data_cfg)
    sae_cfg = config.SparseAutoencoder(d_vit=D_VIT, exp_factor=8, n_reinit_samples=0)
    base = config.Train(data=data_cfg, sae=sae_cfg, sae_batch_size=args.batch_size, n_lr_warmup=100, track=False)
    cfgs = config.grid(base, {"lr": [3e-4, 1e-3], "sae": {"sparsity_coeff": [1e-4, 4e-4, 1.6e-3]}})
    rows, seconds = [], {}
    runs = [("random", 512, 0)] + [("blocks", w, 0) for w in args.window_imgs]
    runs += [("random", 512, 1), ("ordered", 512, 0)] if args.control else []
    for mode, window_imgs, seed in runs:
        t0 = time.perf_counter()
        rows += train_and_eval(mode, acts, preprocess, cfgs, args.n_steps, args.batch_size, window_imgs, seed)
        seconds[rows[-1]["mode"]] = time.perf_counter() - t0
        print(rows[-1]["mode"], f"{seconds[rows[-1]['mode']]:.0f} s", flush=True)
    report = {"n_examples": len(acts), "n_steps": args.n_steps, "batch_size": args.batch_size, "epochs": args.n_steps * args.batch_size / len(acts),
              "mix": class_mix(acts, args.batch_size), "seconds": seconds, "rows": rows}  # fmt: skip
    harness.write(args.out, report, markdown(report), indent=2)


def markdown(report: dict) -> str:
    ref = {(r["lr"], r["sparsity_coeff"]): r for r in report["rows"] if r["mode"] == "random, seed 0"}
    lines = [
        "# `blocks` against the full permutation, on a class-ordered shard set",
        "",
        f"{report['n_examples']:,} examples (32 classes x 256 images x 64 patches, d_vit 64, images in class order); "
        f"6 SAEs (exp 8) trained {report['n_steps']} steps of {report['batch_size']} ({report['epochs']:.1f} epochs) "
        "per mode, evaluated on the whole set. `blocks`: 4-image blocks, windows of 512, 1024, 2048 images "
        "(1/16, 1/8, 1/4 of the set); `random, seed 1` shows the spread from the seed alone, `ordered` (no shuffle) "
        "that the set is adversarial.",
        "",
        "Per batch (mean over 20; blocks with 512-image windows): " + "; ".join(
            f"{m}: {v['classes_per_batch']:.1f} classes of 32, {v['images_per_batch']:.0f} images" for m, v in report["mix"].items()),
        "",
    ]  # fmt: skip
    worst = {r["mode"]: 0.0 for r in report["rows"] if r["mode"] != "random, seed 0"}
    rows = []
    for r in report["rows"]:
        base = ref[(r["lr"], r["sparsity_coeff"])]
        d_mse, d_l0 = r["mse"] / base["mse"] - 1, r["l0"] / base["l0"] - 1
        if r["mode"] in worst:
            worst[r["mode"]] = max(worst[r["mode"]], abs(d_mse), abs(d_l0))
        rows.append([f"{r['lr']:g}", f"{r['sparsity_coeff']:g}", r["mode"], f"{r['mse']:.5f}", f"{d_mse:+.2%}",
                     f"{r['l0']:.2f}", f"{d_l0:+.2%}", r["n_dead"]])  # fmt: skip
    lines += harness.table(["lr", "sparsity", "mode", "eval MSE", "vs random", "L0", "vs random", "dead"], rows)
    lines += [
        "",
        "Largest |relative difference| from `random, seed 0` over MSE and L0, per mode: "
        + "; ".join(f"{m}: {v:.2%}" for m, v in worst.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
