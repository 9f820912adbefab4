"""Several processes of one JAX job on this machine (localhost, gloo) give the same SAEs as one
process; multi-process and Slurm bad input fails clearly and in bounded time."""

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from saev_jax import config, launch
from saev_jax import sae as sae_lib

from .test_cli import shard_root, write_sweep  # noqa: F401 (fixture)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def spawn(args: list[str], devices: int) -> subprocess.Popen:
    env = {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices), "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    return subprocess.Popen(
        [sys.executable, "-m", "saev_jax.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_pop_dist_flags():
    rest, flags = launch.pop_dist_flags(["x.toml", "--lr", "1", "--process-id=1", "--num-processes", "2"])
    assert rest == ["x.toml", "--lr", "1"] and flags == {"--process-id": "1", "--num-processes": "2"}
    with pytest.raises(config.InputError, match="--process-id needs a value"):
        launch.pop_dist_flags(["--process-id"])


@pytest.mark.slow
def test_two_processes_train_the_same_saes_as_one(tmp_path, shard_root):  # noqa: F811
    sweep = write_sweep(tmp_path, shard_root, extra="seed = 5")
    text = sweep.read_text().replace("[1e-3, 1e-2]", "[1e-3, 1e-2, 3e-2]")
    runs = {}
    for name in ("one", "two"):
        fpath = tmp_path / f"{name}.toml"
        fpath.write_text(text.replace(str(tmp_path / "ckpt"), str(tmp_path / name)))
        runs[name] = fpath
    one = spawn([str(runs["one"]), "--n-devices", "1"], devices=1)
    out, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-2000:]
    one_ids = out.splitlines()[-3:]  # The run ids come last, after the summary table.

    port = free_port()
    procs = [
        spawn([str(runs["two"]), "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
               "--process-id", str(i), "--dist-timeout", "60"], devices=2)
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    # gloo prints its connections on stdout; the run ids are the other lines.
    ids_of = lambda out: [line for line in out.splitlines() if line and not line.startswith("[Gloo]")]  # noqa: E731
    two_ids = ids_of(outs[0][0])[-3:]
    assert ids_of(outs[1][0]) == []  # Only process 0 writes and reports.
    assert "4 devices" in outs[0][1]
    for a, b in zip(one_ids, two_ids):
        sa, sb = sae_lib.load(tmp_path / "one" / a).sae, sae_lib.load(tmp_path / "two" / b).sae
        assert (
            sae_lib.load_cfg(tmp_path / "one" / a).sae.sparsity_coeff
            == sae_lib.load_cfg(tmp_path / "two" / b).sae.sparsity_coeff
        )
        for n in sae_lib.TENSOR_NAMES:
            np.testing.assert_allclose(getattr(sa, n), getattr(sb, n), rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.slow
def test_unreachable_coordinator_is_a_clear_error_in_bounded_time(tmp_path, shard_root):  # noqa: F811
    sweep = write_sweep(tmp_path, shard_root)
    t0 = time.perf_counter()
    proc = spawn([str(sweep), "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2",
                  "--process-id", "1", "--dist-timeout", "5"], devices=1)  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: could not join the multi-process job at localhost:")
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "ckpt").exists()


def test_slurm_without_submitit_refuses_clearly(tmp_path, shard_root, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "submitit", None)
    cfg = config.grid(config.Train(), config.load_sweep(write_sweep(tmp_path, shard_root, extra="slurm = true")))[0]
    with pytest.raises(config.InputError, match=r"slurm = true: submitting Slurm jobs needs submitit"):
        launch.submit_slurm([[cfg]], print)
