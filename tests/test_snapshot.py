"""Snapshots: bit-exact round trips, damage detection, keeping two, full disks, the checkpoint lock."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saev_jax import config, snapshot


class Stack(eqx.Module):
    W_enc: jax.Array
    b_dec: jax.Array
    opt_state: optax.OptState
    diverged_at: jax.Array
    act: object  # A non-array leaf: restored from `like`, never saved.


class State(eqx.Module):
    stacks: tuple[Stack, ...]
    step: jax.Array
    scale: jax.Array


def make_group_state(seed: int) -> State:
    """A GroupState-like pytree: float32 with NaN, bfloat16, int32, bool, an Optax state."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    stacks = []
    for m, (d, d_sae) in enumerate([(4, 8), (4, 12)]):
        W = jax.random.normal(k1, (3, d, d_sae)) * 1e-3 + m
        b = jax.random.normal(k2, (3, d)).astype(jnp.bfloat16)
        opt_state = optax.adam(1e-3).init({"W": W, "b": b})
        # Nonzero Adam moments, so the round trip is tested on values that are not all zero.
        _, opt_state = optax.adam(1e-3).update({"W": W * 2, "b": b}, opt_state)
        stacks.append(Stack(W, b, opt_state, jnp.array([-1, 7, -1], jnp.int32), jax.nn.relu))
    W = stacks[0].W_enc.at[1, 0, 0].set(jnp.nan).at[2, 0, 0].set(-jnp.inf)
    stacks[0] = eqx.tree_at(lambda s: s.W_enc, stacks[0], W)
    return State(tuple(stacks), jnp.asarray(seed * 10, jnp.int32), jax.random.uniform(k3, ()) > 0.5)


def assert_bit_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if eqx.is_array(x):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
        else:
            assert x is y


def test_round_trip_is_bit_exact_with_meta(tmp_path):
    state = make_group_state(3)
    meta = {
        "group": "abc",
        "step": 30,
        "ids": ["a1", "b2"],
        "cfgs": [config.to_dict(config.Train())],
        "journal": {"a1": 123},
    }
    fpath = snapshot.save(tmp_path, 30, state, meta)
    assert fpath == tmp_path / "snapshot-000000000030" and fpath.is_dir()
    assert snapshot.latest(tmp_path) == (30, fpath)
    got, got_meta = snapshot.restore(fpath, like=make_group_state(0))
    assert_bit_equal(got, state)
    assert got_meta == meta
    # An abstract `like` (eqx.filter_eval_shape) works as well and gives JAX arrays.
    got, _ = snapshot.restore(fpath, like=eqx.filter_eval_shape(make_group_state, 0))
    assert isinstance(got.stacks[1].opt_state[0].mu["W"], jax.Array)
    assert_bit_equal(got, state)


def test_state_file_is_plain_safetensors_keyed_by_tree_path(tmp_path):
    import safetensors.numpy

    state = {"a": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": [jnp.int32(4)]}
    fpath = snapshot.save(tmp_path, 1, state, {})
    tensors = safetensors.numpy.load_file(fpath / "state.safetensors")
    assert set(tensors) == {"['a']", "['b'][0]"}
    np.testing.assert_array_equal(tensors["['a']"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tensors["['b'][0]"].shape == () and tensors["['b'][0]"] == 4


def test_keeps_the_saved_snapshot_and_the_one_before(tmp_path):
    for step in (10, 20, 30):
        snapshot.save(tmp_path, step, make_group_state(step), {"step": step})
    assert [s for s, _ in snapshot.list_snapshots(tmp_path)] == [20, 30]
    # Saving the same step again replaces it.
    snapshot.save(tmp_path, 30, make_group_state(4), {"step": 30, "again": True})
    assert [s for s, _ in snapshot.list_snapshots(tmp_path)] == [20, 30]
    assert snapshot.restore(snapshot.get_dpath(tmp_path, 30), make_group_state(0))[1]["again"]
    # Resumed from 20 and saved 25: 30 belongs to an abandoned timeline.
    snapshot.save(tmp_path, 25, make_group_state(25), {"step": 25})
    assert [s for s, _ in snapshot.list_snapshots(tmp_path)] == [20, 25]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    snapshot.clear(tmp_path)
    assert snapshot.latest(tmp_path) is None and tmp_path.is_dir()


def damage_truncate(fpath):
    p = fpath / "state.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def damage_flip_byte(fpath):
    p = fpath / "state.safetensors"
    raw = bytearray(p.read_bytes())
    raw[len(raw) - 5] ^= 0x01
    p.write_bytes(bytes(raw))


def damage_meta(fpath):
    p = fpath / "meta.json"
    p.write_text(p.read_text().replace("20", "21"))


def damage_manifest(fpath):
    (fpath / "manifest.json").write_bytes(b"\x00" * 10)


def damage_missing_file(fpath):
    (fpath / "state.safetensors").unlink()


@pytest.mark.parametrize(
    "damage", [damage_truncate, damage_flip_byte, damage_meta, damage_manifest, damage_missing_file]
)
def test_damaged_newest_snapshot_is_skipped_with_one_line(tmp_path, caplog, damage):
    state10 = make_group_state(10)
    snapshot.save(tmp_path, 10, state10, {"step": 10})
    newest = snapshot.save(tmp_path, 20, make_group_state(20), {"step": 20})
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="saev_jax.snapshot"):
        step, fpath = snapshot.latest(tmp_path)
    assert step == 10
    (record,) = caplog.records
    assert "snapshot-000000000020" in record.getMessage() and "using snapshot-000000000010" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert_bit_equal(snapshot.restore(fpath, make_group_state(0))[0], state10)
    with pytest.raises(config.InputError, match="damaged snapshot"):
        snapshot.restore(newest, make_group_state(0))


def test_only_damaged_snapshots_gives_none(tmp_path, caplog):
    damage_flip_byte(snapshot.save(tmp_path, 5, make_group_state(5), {}))
    assert snapshot.latest(tmp_path) is None
    assert "no earlier snapshot" in caplog.text
    assert snapshot.latest(tmp_path / "absent") is None


def test_restore_names_the_key_that_does_not_fit(tmp_path):
    fpath = snapshot.save(tmp_path, 1, make_group_state(1), {})
    wider = make_group_state(1)
    wider = eqx.tree_at(lambda s: s.stacks[1].W_enc, wider, jnp.zeros((3, 4, 16)))
    with pytest.raises(
        config.InputError, match=r"\.stacks\[1\]\.W_enc is float32\[3, 4, 12\] in the snapshot, float32\[3, 4, 16\] now"
    ):
        snapshot.restore(fpath, wider)
    with pytest.raises(config.InputError, match=r"holds \.stacks\[1\]"):
        snapshot.restore(fpath, eqx.tree_at(lambda s: s.stacks, make_group_state(1), make_group_state(1).stacks[:1]))


def test_full_disk_leaves_no_partial_snapshot_and_keeps_the_last(tmp_path, monkeypatch):
    state10 = make_group_state(10)
    snapshot.save(tmp_path, 10, state10, {"step": 10})
    real_write = snapshot._write_bytes

    def full(fpath, payload):
        real_write(fpath, payload[: len(payload) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(snapshot, "_write_bytes", full)
    with pytest.raises(config.InputError, match=r"could not write the snapshot of step 20: No space left on device"):
        snapshot.save(tmp_path, 20, make_group_state(20), {"step": 20})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot-000000000010"]
    assert snapshot.latest(tmp_path)[0] == 10
    # Failing to replace a snapshot of the same step keeps the old one.
    with pytest.raises(config.InputError):
        snapshot.save(tmp_path, 10, make_group_state(11), {"step": 10})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot-000000000010"]
    assert_bit_equal(snapshot.restore(snapshot.latest(tmp_path)[1], make_group_state(0))[0], state10)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs at tmp_path/mnt (needs root and a kernel that lets us mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_really_full_disk(tiny_tmpfs):
    small = {"W": jnp.ones((64, 64))}
    snapshot.save(tiny_tmpfs, 1, small, {})
    with pytest.raises(config.InputError, match="No space left on device"):
        snapshot.save(tiny_tmpfs, 2, {"W": jnp.ones((128, 128))}, {})
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["snapshot-000000000001"]
    assert snapshot.latest(tiny_tmpfs)[0] == 1


def test_read_only_ckpt_dir_is_a_clear_error(tiny_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(config.InputError, match=r"ckpt_path .*mnt: cannot write there: Read-only file system"):
        with snapshot.lock_ckpt_dir(tiny_tmpfs):
            pass
    with pytest.raises(config.InputError, match="Read-only file system"):
        snapshot.save(tiny_tmpfs / "snapshots", 1, {"W": jnp.ones(3)}, {})


def test_stale_temporary_directories_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".snapshot-000000000007.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "state.safetensors").write_bytes(b"half")
    assert snapshot.latest(tmp_path) is None
    snapshot.save(tmp_path, 8, {"x": jnp.ones(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot-000000000008"]


def test_diff_configs_names_the_first_differing_key():
    a = config.to_dict(config.Train())
    b = config.to_dict(config.Train(sae=config.SparseAutoencoder(sparsity_coeff=3e-3)))
    assert snapshot.diff_configs([a, a], [a, a]) is None
    # JSON round trips (tuples become lists) are no difference.
    assert snapshot.diff_configs([json.loads(json.dumps(a))], [a]) is None
    assert snapshot.diff_configs([a, a], [a, b]) == "config 1: sae.sparsity_coeff = 0.0004 in the snapshot, 0.003 now"
    assert snapshot.diff_configs([a], [a, a]) == "the snapshot holds 1 configs, the command gives 2"
    assert snapshot.diff_configs([a], [a | {"new_key": 1}]) == 'config 0: new_key = "<absent>" in the snapshot, 1 now'


def test_second_holder_of_the_ckpt_dir_is_refused(tmp_path):
    with snapshot.lock_ckpt_dir(tmp_path / "ckpt"):
        with pytest.raises(config.InputError, match=rf"ckpt_path .*ckpt is in use by saev_jax pid {os.getpid()} on "):
            with snapshot.lock_ckpt_dir(tmp_path / "ckpt"):
                pass
    # Released when the block ends.
    with snapshot.lock_ckpt_dir(tmp_path / "ckpt"):
        pass


def test_another_process_holding_the_ckpt_dir_is_named(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from saev_jax import snapshot
        with snapshot.lock_ckpt_dir({str(tmp_path)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(config.InputError, match=rf"in use by saev_jax pid {proc.pid} on "):
            with snapshot.lock_ckpt_dir(tmp_path):
                pass
    finally:
        proc.communicate("\n", timeout=60)
    with snapshot.lock_ckpt_dir(tmp_path):
        pass
