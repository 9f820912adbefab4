"""Where a sweep runs: one process, several processes of one JAX job, or Slurm jobs.

- Several processes (one per host, or one per GPU under Slurm): `jax.distributed.initialize`
  before any other JAX call. It detects Slurm steps (`srun`) and Cloud TPU pods by itself;
  anything else passes `--coordinator-address HOST:PORT --num-processes N --process-id I`.
  Every process runs the same jitted calls in the same order and reads the same batches;
  process 0 alone evaluates, logs to wandb, writes checkpoints and the summary, and the
  others wait for it at a barrier.
- `slurm = true` in a config: submit one Slurm job per group with submitit, as saev did
  (`pip install 'saev_jax[slurm]'`), instead of training where the command was started.
"""

import dataclasses
import logging
import os
import socket
import time

from . import config

logger = logging.getLogger(__name__)

DIST_FLAGS = ("--coordinator-address", "--num-processes", "--process-id", "--dist-timeout")
SLURM_HOURS = 24
"""Time limit of each submitted Slurm job."""


def pop_dist_flags(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Removes the multi-process flags (see DIST_FLAGS) from `args`; returns the rest and their values."""
    rest, found = [], {}
    it = iter(args)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in DIST_FLAGS:
            if not eq:
                value = next(it, None)
                if value is None:
                    raise config.InputError(f"{name} needs a value")
            found[name] = value
        else:
            rest.append(arg)
    return rest, found


def in_cluster_job() -> bool:
    """Whether this process is one task of a multi-task Slurm step or a Cloud TPU pod worker."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ:
        return True
    return "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]


def init_distributed(flags: dict[str, str]) -> None:
    """Starts JAX's multi-process runtime if the flags or the environment ask for it; else nothing.

    Must run before any other JAX call. Raises InputError, within `--dist-timeout` seconds
    (default 120), when the coordinator cannot be reached.
    """
    import jax

    explicit = {k: flags[k] for k in DIST_FLAGS[:3] if k in flags}
    if not explicit and not in_cluster_job():
        return
    try:
        timeout = int(flags.get("--dist-timeout", "120"))
        kwargs = {}
        if explicit:
            missing = [k for k in DIST_FLAGS[:3] if k not in explicit]
            if missing:
                raise config.InputError(f"{', '.join(missing)} missing: give all of {', '.join(DIST_FLAGS[:3])}")
            kwargs = dict(
                coordinator_address=explicit["--coordinator-address"],
                num_processes=int(explicit["--num-processes"]),
                process_id=int(explicit["--process-id"]),
            )
    except ValueError as err:
        if isinstance(err, config.InputError):
            raise
        raise config.InputError(f"multi-process flags: {err}") from None
    where = kwargs.get("coordinator_address", "the cluster's coordinator")
    if kwargs.get("process_id", 0) != 0:
        # JAX aborts the whole process (no exception) when the coordinator is unreachable.
        wait_for_coordinator(kwargs["coordinator_address"], timeout)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    except Exception as err:  # JAX raises several types (RuntimeError, XlaRuntimeError, ...)
        first = (str(err).strip().splitlines() or [""])[0]
        raise config.InputError(
            f"could not join the multi-process job at {where} within {timeout} s: {type(err).__name__}: {first}"
        ) from None
    logger.info(
        "Process %d of %d (%d local devices).", jax.process_index(), jax.process_count(), jax.local_device_count()
    )


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once `host:port` accepts TCP connections; InputError after `timeout` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise config.InputError(f"--coordinator-address {address!r}: must be HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise config.InputError(
                    f"could not join the multi-process job at {address} within {timeout:g} s: {err.strerror or err}"
                ) from None
        time.sleep(0.5)


def is_lead() -> bool:
    """Whether this process evaluates, logs and writes (process 0, or the only one)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process of the job reaches the barrier `name` (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def submit_slurm(groups: list[list[config.Train]], main) -> list[str]:
    """Submits `main(group)` as one Slurm job per group (submitit); returns the job ids.

    Resources as saev asked for them: one node, the config's devices (`n_devices`, 0 meaning 1)
    as GPUs, `n_workers` + 4 CPUs, account `slurm_acct`, logs under `log_to`.
    """
    try:
        import submitit
    except ImportError:
        raise config.InputError(
            "slurm = true: submitting Slurm jobs needs submitit (pip install 'saev_jax[slurm]'); "
            "or set slurm = false and launch with srun yourself (README: Slurm)"
        ) from None
    job_ids = []
    for group in groups:
        cfg = group[0]
        executor = submitit.SlurmExecutor(folder=cfg.log_to)
        params = dict(
            time=SLURM_HOURS * 60,
            nodes=1,
            ntasks_per_node=1,
            gpus_per_node=max(1, cfg.n_devices),
            cpus_per_task=min(cfg.n_workers, 64) + 4,
            stderr_to_stdout=True,
        )
        if cfg.slurm_acct:
            params["account"] = cfg.slurm_acct
        executor.update_parameters(**params)
        # The job trains where it runs: it must not submit itself again.
        job = executor.submit(main, [dataclasses.replace(c, slurm=False) for c in group])
        logger.info("Submitted %d configs as Slurm job %s (logs in %s).", len(group), job.job_id, cfg.log_to)
        job_ids.append(str(job.job_id))
    return job_ids
