"""The original saev training loop, written plainly in PyTorch from SPEC 3: the baseline saev_jax is measured against.

What makes it the original and not a fast PyTorch trainer, on purpose:
- a list of SAE modules and a Python loop over them for every batch, one `.backward()` per SAE;
- one `torch.optim.Adam` with one parameter group per SAE, learning rates set by hand each step;
- `.item()` syncs for every metric of every SAE on log steps;
- data from the per-example, map-style `saev_jax.data.Dataset` behind a shuffling `DataLoader`.

Where SPEC 3 and the original disagree, this follows SPEC 3 (as saev_jax does), so both
programs compute the same thing and their speed can be compared:
- `lr_t = lr * min(t / n_lr_warmup, 1)` with t = steps already taken (the original set the
  group's lr after the step, so its first step used the full lr);
- the sparsity coefficient warms up the same way and reaches the loss (the original computed it
  and never used it);
- the parallel gradient is `(g . w / w . w) w` (the original assumed unit rows: `(g . w) w`).

    python -m benchmarks.torch_baseline --shard-root DIR [--n-saes 4 --n-steps 50 ...]
"""

import argparse
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from benchmarks import harness

logger = logging.getLogger(__name__)


class SAE(torch.nn.Module):
    """One sparse autoencoder (SPEC 3), with saev's parameter names and shapes."""

    def __init__(self, d_vit: int, d_sae: int, *, sparsity_coeff: float):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.nn.init.kaiming_uniform_(torch.empty(d_vit, d_sae)))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_vit)))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_vit))
        self.sparsity_coeff = sparsity_coeff

    def forward(self, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and its terms on a batch, as 0-d tensors (still on the device)."""
        f_BS = torch.relu((x_BD - self.b_dec) @ self.W_enc + self.b_enc)
        x_hat_BD = f_BS @ self.W_dec + self.b_dec
        mse = safe_mse(x_hat_BD, x_BD)
        l0 = (f_BS > 0).float().sum(dim=1).mean()
        l1 = f_BS.sum(dim=1).mean()
        sparsity = self.sparsity_coeff * l1
        return {"loss": mse + sparsity, "mse": mse, "l1": l1, "l0": l0, "sparsity": sparsity}

    @torch.no_grad()
    def normalize_w_dec(self) -> None:
        self.W_dec.data /= torch.linalg.vector_norm(self.W_dec.data, dim=1, keepdim=True)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        W_SD, g_SD = self.W_dec.data, self.W_dec.grad
        coeff_S1 = (g_SD * W_SD).sum(dim=1, keepdim=True) / (W_SD * W_SD).sum(dim=1, keepdim=True)
        g_SD -= coeff_S1 * W_SD


def safe_mse(x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """saev's MSE: divide both by max|x|, square, mean, then multiply by max|x| twice."""
    upper = x_BD.abs().max()
    return ((x_hat_BD / upper - x_BD / upper) ** 2).mean() * upper * upper


def warmup(peak: float, n_steps: int, t: int) -> float:
    """`peak * min(t / n_steps, 1)` after t steps; `n_steps == 0` means no warm-up."""
    return peak * min(t / n_steps, 1.0) if n_steps > 0 else peak


@dataclasses.dataclass(frozen=True)
class Hparams:
    """One SAE's optimisation settings (the fields of saev's `Train` and `SparseAutoencoder` it reads)."""

    lr: float
    n_lr_warmup: int
    sparsity_coeff: float
    n_sparsity_warmup: int
    normalize_w_dec: bool
    remove_parallel_grads: bool

    @classmethod
    def from_cfg(cls, cfg) -> "Hparams":
        """From a `saev_jax.config.Train`."""
        return cls(
            lr=cfg.lr,
            n_lr_warmup=cfg.n_lr_warmup,
            sparsity_coeff=cfg.sae.sparsity_coeff,
            n_sparsity_warmup=cfg.n_sparsity_warmup,
            normalize_w_dec=cfg.sae.normalize_w_dec,
            remove_parallel_grads=cfg.sae.remove_parallel_grads,
        )


class Trainer:
    """Trains a list of SAEs on one stream of batches, the way saev does it."""

    def __init__(self, saes: list[SAE], hparams: list[Hparams]):
        self.saes, self.hparams = saes, hparams
        groups = [{"params": list(sae.parameters()), "lr": hp.lr} for sae, hp in zip(saes, hparams)]
        # One Adam over per-SAE parameter groups, as saev. The fused kernel (CUDA, recent CPU builds)
        # can only make the baseline faster; fall back to the default where torch has none.
        try:
            self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except RuntimeError:
            self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8)
        self.n_steps = 0

    def step(self, x_BD: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """One optimizer step of every SAE on the batch; returns each SAE's loss terms before the update."""
        t = self.n_steps
        for sae, hp, group in zip(self.saes, self.hparams, self.optimizer.param_groups):
            if hp.normalize_w_dec:
                sae.normalize_w_dec()
            sae.sparsity_coeff = warmup(hp.sparsity_coeff, hp.n_sparsity_warmup, t)
            group["lr"] = warmup(hp.lr, hp.n_lr_warmup, t)
        losses = [sae(x_BD) for sae in self.saes]
        for loss in losses:
            loss["loss"].backward()
        for sae, hp in zip(self.saes, self.hparams):
            if hp.remove_parallel_grads:
                sae.remove_parallel_grads()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.n_steps += 1
        return losses

    def metrics(self, losses: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
        """saev's log dict per SAE, one `.item()` (one device sync) per SAE per metric, as the original."""
        t = self.n_steps - 1
        return [
            {f"losses/{key}": loss[key].item() for key in ("mse", "l1", "sparsity", "loss")}
            | {"metrics/l0": loss["l0"].item(), "metrics/l1": loss["l1"].item()}
            | {
                "progress/learning_rate": warmup(hp.lr, hp.n_lr_warmup, t),
                "progress/sparsity_coeff": warmup(hp.sparsity_coeff, hp.n_sparsity_warmup, t),
            }
            for loss, hp in zip(losses, self.hparams)
        ]


def set_tf32(on: bool) -> None:
    """saev's matmul setting: `saev/training.py` turns TF32 on for CUDA matmuls and cuDNN (no effect on a CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def make_saes(cfgs, device: torch.device) -> list[SAE]:
    """One torch SAE per `saev_jax.config.Train`, seeded with torch's RNG from `sae.seed` (as saev)."""
    saes = []
    for cfg in cfgs:
        torch.manual_seed(cfg.sae.seed)
        with device:  # Initialise on the device: large SAEs are slow to initialise on the host.
            saes.append(SAE(cfg.sae.d_vit, cfg.sae.d_sae, sparsity_coeff=cfg.sae.sparsity_coeff))
    return saes


def from_arrays(arrays: dict[str, object], sparsity_coeff: float, device: torch.device) -> SAE:
    """An SAE holding the given `W_enc`, `b_enc`, `W_dec`, `b_dec` (NumPy or JAX arrays), as float32 copies."""
    d_vit, d_sae = arrays["W_enc"].shape
    sae = SAE(d_vit, d_sae, sparsity_coeff=sparsity_coeff)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.from_numpy(np.array(arrays[name], dtype=np.float32)))
    return sae.to(device)


def make_dataloader(cfg, dataset) -> torch.utils.data.DataLoader:
    """saev's loader: the per-example map-style dataset, shuffled, `n_workers` worker processes."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.sae_batch_size,
        shuffle=True,
        num_workers=cfg.n_workers,
        persistent_workers=False,
        pin_memory=False,
    )


def batches(dataloader: Iterable[dict[str, torch.Tensor]], n_patches: int) -> Iterator[dict[str, torch.Tensor]]:
    """saev's BatchLimiter: epochs of the loader until more than `n_patches` examples have been seen."""
    n_seen = 0
    while True:
        for batch in dataloader:
            yield batch
            n_seen += len(batch["act"])
            if n_seen > n_patches:
                return


def train(
    trainer: Trainer,
    stream: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    log_every: int,
    on_log: Callable[[int, list[dict[str, float]]], None] | None = None,
) -> int:
    """The original loop: move each batch to the device, step every SAE, log every `log_every` steps.

    `on_log(step, metrics)` receives the metrics of each log step (after their `.item()` syncs).
    Returns the number of steps taken.
    """
    step = 0
    for step, batch in enumerate(stream):
        x_BD = batch["act"].to(device, non_blocking=True)
        losses = trainer.step(x_BD)
        if step % log_every == 0:
            metrics = trainer.metrics(losses)
            if on_log is not None:
                on_log(step, metrics)
            else:
                logger.info("step %d: loss %s", step, [round(m["losses/loss"], 5) for m in metrics])
    return step + 1


def main() -> None:
    """Trains `--n-saes` SAEs (differing only in seed) on a shard directory with the original loop and reports examples/s."""
    from saev_jax import config, data

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--shard-root", required=True)
    parser.add_argument("--n-saes", type=int, default=4)
    parser.add_argument("--exp-factor", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TF32 matmuls, as saev runs on a GPU (default: full float32)",
    )
    args = parser.parse_args()
    set_tf32(args.tf32)

    device = torch.device(args.device)
    data_cfg = config.DataLoad(shard_root=args.shard_root)
    dataset = data.Dataset(data_cfg)
    d_vit = dataset[0]["act"].shape[0]
    cfgs = [
        config.Train(
            data=data_cfg,
            n_workers=args.n_workers,
            sae_batch_size=args.batch_size,
            n_patches=args.n_steps * args.batch_size - 1,
            log_every=args.log_every,
            sae=config.SparseAutoencoder(d_vit=d_vit, exp_factor=args.exp_factor, seed=m),
        )
        for m in range(args.n_saes)
    ]
    trainer = Trainer(make_saes(cfgs, device), [Hparams.from_cfg(c) for c in cfgs])
    stream = batches(make_dataloader(cfgs[0], dataset), cfgs[0].n_patches)
    taken = []  # the steps the loop took: an epoch ending in a short batch makes it differ from --n-steps

    def run() -> None:
        taken.append(train(trainer, stream, device, log_every=args.log_every))

    # One timed pass, loader start-up included, closed by a device sync: the original as a user runs it.
    seconds = harness.median_time(run, n_warmup=0, n_repeats=1, sync=lambda _: harness.sync_torch(device))["seconds"]
    n_steps = taken[0]
    n = n_steps * args.batch_size
    print(f"{n_steps} steps, {n / seconds:,.0f} examples/s, {n * args.n_saes / seconds:,.0f} SAE-examples/s")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    main()
