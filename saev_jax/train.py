"""`python -m saev_jax.train SWEEP.toml ... [--field value ...] [--dry-run]`: trains a sweep.

The command over `training.py`: it turns the command line (sweep files, tyro flags, saev's
spellings) into configs, prints the plan for `--dry-run`, or joins the processes of a
multi-host job and trains.

    python -m saev_jax.train sweeps/x.toml --data.shard-root DIR [--lr 1e-3 ...]
"""

import dataclasses
import json
import logging
import pathlib
import sys

import tyro

from . import config, data, launch, snapshot
from .training import main, n_train_steps, open_group, plan_group

logger = logging.getLogger(__name__)


USAGE = "python -m saev_jax.train [SWEEP.toml ...] [--sweep SWEEP.toml] [--dry-run] [--field value ...]"
CLI_HELP = """Trains every config of the sweep files (or the one config the flags give).

Flags set the base config; a sweep file's values override them (with one warning per flag it
overrides) and its lists become a grid. Several sweep files give the union of their grids,
trained together where they can share data (files trained together must agree on every key of
config.CANNOT_PARALLELIZE: ckpt_path, n_patches, sae_batch_size, the [data] table, ...). Each
file's seeds are those it gets alone; each group is named by what its configs share
(group-<hash>), so a rerun with another file added still resumes or skips it. sae.d_vit
defaults to the shards' d_vit.

--sweep FILE           a sweep file (as saev wrote it; the same as a leading FILE)
--dry-run              print the configs, groups, stacks, seeds, checkpoint and snapshot
                       directories and the memory plan, check the data, and exit without training
--data.no-scale-mean   saev's spelling of --data.scale-mean False (also --data.no-scale-norm)

Several processes (one per host or GPU; Slurm and Cloud TPU pods need none of these):
--coordinator-address HOST:PORT --num-processes N --process-id I [--dist-timeout S (default 120)]
"""


def parse_cli(argv: list[str]) -> tuple[list[config.Train], list[str], bool]:
    """The configs a command line gives, the sweep file each came from ("" for the flags alone), and --dry-run.

    Raises InputError for a missing or invalid sweep file, naming every unknown key of a file at once.
    """
    args, sweep_fpaths, dry_run = list(argv), [], False
    while args and not args[0].startswith("-"):
        sweep_fpaths.append(args.pop(0))
    rest = []
    while args:
        arg = args.pop(0)
        if arg == "--dry-run":
            dry_run = True
        elif arg == "--sweep":
            if not args:
                raise config.InputError("--sweep: needs a sweep file")
            sweep_fpaths.append(args.pop(0))
        elif arg.startswith("--sweep="):
            sweep_fpaths.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    rest = config.normalize_flags(rest)
    base = tyro.cli(config.Train, args=rest, prog=USAGE, description=CLI_HELP)
    flags = config.flag_keys(rest)
    if not sweep_fpaths:
        return _shard_d_vit([base], {"sae.d_vit"} & set(flags)), [""], dry_run
    cfgs, sources = [], []
    for fpath in sweep_fpaths:
        sweep = config.load_sweep(fpath)
        config.check_sweep_keys(sweep, fpath)
        for key, flag, given, value in config.overridden_flags(sweep, flags, base):
            print(
                f"warning: {fpath} sets {key} = {json.dumps(value)}, overriding {flag} {json.dumps(given)}",
                file=sys.stderr,
            )
        given = set(flags) | {key for key, _ in config.sweep_items(sweep)}
        # Each file's grid as if it were alone on the command line: its seeds are saev's grid() order.
        file_cfgs = _shard_d_vit(config.grid(base, sweep), given)
        cfgs += file_cfgs
        sources += [fpath] * len(file_cfgs)
    return cfgs, sources, dry_run


def _shard_d_vit(cfgs: list[config.Train], given: set[str]) -> list[config.Train]:
    """`cfgs` with sae.d_vit from their shards' metadata.json unless `given` holds it (a flag or a sweep key).

    Shards that cannot be read leave d_vit as it is: `open_group` reports them.
    """
    if "sae.d_vit" in given:
        return cfgs
    found: dict[str, int | None] = {}
    out = []
    for cfg in cfgs:
        root = cfg.data.shard_root
        if root not in found:
            try:
                found[root] = data.Metadata.load(root).d_vit
            except (config.InputError, OSError):
                found[root] = None
        d_vit = found[root]
        out.append(cfg if d_vit is None else dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, d_vit=d_vit)))
    return out


def dry_run(cfgs: list[config.Train], sources: list[str], *, file=None) -> None:
    """Prints what `main(cfgs)` would train, and where, without training or writing anything.

    The data and configs are checked as `main` checks them (InputError as there) and the planner
    gives each group's stacks and memory plan.
    """
    file = sys.stdout if file is None else file
    groups = config.split_cfgs(cfgs)
    where = {id(c): s for c, s in zip(cfgs, sources)}
    print(f"{len(cfgs)} configs in {len(groups)} group(s); nothing is trained (--dry-run).", file=file)
    for i, group in enumerate(groups):
        open_group(group)
        group_plan, _ = plan_group(group)
        cfg = group[0]
        print(f"\n{config.group_name(group)} ({i + 1}/{len(groups)}): {len(group)} SAEs, "
              f"shards {cfg.data.shard_root} (layer {cfg.data.layer}, {cfg.data.patches}), n_patches {cfg.n_patches:,}, "
              f"batch {cfg.sae_batch_size}, {n_train_steps(cfg):,} steps, data seed {cfg.seed}", file=file)  # fmt: skip
        stack_of, n = {}, 0
        for r, rnd in enumerate(group_plan.rounds):
            name = config.group_name(group) + (f"-round-{r + 1}" if len(group_plan.rounds) > 1 else "")
            snaps = pathlib.Path(cfg.ckpt_path) / "snapshots" / name
            state = (
                "finished: skipped"
                if (snaps / "done.json").is_file()
                else "resumes"
                if snapshot.latest(snaps)
                else "new"
            )
            state = "--fresh: trains afresh" if cfg.fresh else state
            label = f"round {r + 1}/{len(group_plan.rounds)} " if len(group_plan.rounds) > 1 else ""
            print(f"  {label}snapshots: {snaps}/ ({state})", file=file)
            for s in rnd.stacks:
                n += 1
                stack_of |= {j: n for j in s.cfg_indices}
        print(
            f"  checkpoints: {pathlib.Path(cfg.ckpt_path) / '<run id>'}/ (the wandb run id, made when training starts)",
            file=file,
        )
        for line in group_plan.lines():
            print(f"  {line}", file=file)
        print("  config  stack  kind        d_sae   sparsity setting       lr        seed  sae.seed  from", file=file)
        for j, c in enumerate(group):
            name, value = c.sae.setting
            setting = f"{name} {value:g}"
            print(f"  {j:>6}  {stack_of[j]:>5}  {c.sae.kind:<10}  {c.sae.d_sae:>5}   {setting:<21}  {c.lr:<8g}  {c.seed:>4}  {c.sae.seed:>8}  "
                  f"{where.get(id(c)) or '(flags)'}", file=file)  # fmt: skip


def cli(argv: list[str] | None = None) -> list[str]:
    """`python -m saev_jax.train [SWEEP.toml ...] [--field value ...]` (see `CLI_HELP`); returns the run ids.

    Flags override `Train`'s defaults; a sweep file's values override the flags and its
    lists become a grid. Several sweep files give the union of their grids (grouped as one
    sweep), e.g. ReLU over sparsity coefficients and TopK over k, trained in one pass.
    (`__main__` also takes the multi-process flags of `launch.py`.)
    """
    cfgs, sources, dry = parse_cli(list(sys.argv[1:] if argv is None else argv))
    if dry:
        dry_run(cfgs, sources)
        return []
    logger.info("%d configs in %d groups.", len(cfgs), len(config.split_cfgs(cfgs)))
    return main(cfgs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # Not its backend probing at INFO.
    try:
        argv, dist_flags = launch.pop_dist_flags(sys.argv[1:])
        launch.init_distributed(dist_flags)
        run_ids = cli(argv)
    except config.InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if run_ids:
        print(f"run ids ({len(run_ids)}; each checkpoint is <ckpt_path>/<run id>/, also the wandb run id):")
        print("\n".join(run_ids))
