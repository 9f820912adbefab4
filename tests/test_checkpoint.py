"""Checkpoints that travel: self-contained directories, saev's sae.pt both ways, folding, the export CLI.

Everything here needs only our own dependencies (torch included); the peers' own code is
exercised in tests/test_interop.py.
"""

import json
import pathlib
import pickle
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from saev_jax import checkpoint, config, data, export, kinds
from saev_jax import sae as sae_lib

D, S = 8, 24


def make_run(tmp_path: pathlib.Path, name: str = "run", *, stats: bool = True, seed: int = 0) -> pathlib.Path:
    """A trained-looking checkpoint: random weights, a non-trivial mean and scalar, frequencies."""
    rng = np.random.default_rng(seed)
    sae = sae_lib.SAE(D, S, key=jax.random.key(seed))
    sae = jax.tree.map(lambda leaf: leaf + 0.1 * rng.normal(size=leaf.shape).astype(np.float32), sae)  # non-zero biases
    cfg = config.Train(
        sae=config.SparseAutoencoder(d_vit=D, exp_factor=S // D, sparsity_coeff=1e-3, seed=seed), lr=1e-3
    )
    preprocess = data.Preprocess(50.0, rng.normal(3.0, 1.0, size=D).astype(np.float32), 2.5) if stats else None
    freqs = rng.uniform(0, 0.3, size=S).astype(np.float32) if stats else None
    sae_lib.save(sae, tmp_path / name, cfg, {"mse": 0.5}, preprocess, freqs)
    return tmp_path / name


KIND_SETTINGS = {"relu": {}, "topk": {"k": 3}, "batchtopk": {"k": 3}, "matryoshka": {"k": 3}, "jumprelu": {}}


def make_kind_run(tmp_path: pathlib.Path, kind: str, name: str | None = None, seed: int = 0) -> pathlib.Path:
    """A trained-looking checkpoint of `kind`: random weights and biases, statistics, and its inference
    tensors (BatchTopK/Matryoshka: one threshold; JumpReLU: thresholds that differ per latent)."""
    rng = np.random.default_rng(seed)
    cfg = config.Train(
        sae=config.SparseAutoencoder(d_vit=D, exp_factor=S // D, seed=seed, kind=kind, **KIND_SETTINGS[kind])
    )
    sae = jax.tree.map(lambda a: a[0], kinds.make_stack([cfg]))
    sae = eqx.tree_at(
        lambda s: [s.W_enc, s.b_enc, s.b_dec], sae,
        [sae.W_enc + 0.2 * rng.normal(size=(D, S)).astype(np.float32), rng.normal(0, 0.3, S).astype(np.float32), rng.normal(0, 0.5, D).astype(np.float32)],
    )  # fmt: skip
    kind_tensors = {}
    if kind in ("batchtopk", "matryoshka"):
        kind_tensors = {"threshold": np.full(S, 0.4, np.float32)}
    if kind == "jumprelu":
        kind_tensors = {"threshold": rng.uniform(0.1, 0.8, S).astype(np.float32)}
    preprocess = data.Preprocess(50.0, rng.normal(3.0, 1.0, size=D).astype(np.float32), 2.5)
    freqs = rng.uniform(0, 0.3, size=S).astype(np.float32)
    dpath = tmp_path / (name or kind)
    checkpoint.save(sae, dpath, cfg, {"mse": 0.5}, preprocess, freqs, kind_tensors)
    return dpath


def reference_kind_encode(dpath: pathlib.Path, x_raw: np.ndarray, *, pre_acts: np.ndarray | None = None) -> np.ndarray:
    """A checkpoint's features of raw activations in float64 NumPy, from its files (its kind's activation)."""
    cfg = checkpoint.load_cfg(dpath)
    if pre_acts is None:
        w = {k: np.float64(v) for k, v in safetensors.numpy.load_file(dpath / "sae.safetensors").items()}
        p = {k: np.float64(v) for k, v in safetensors.numpy.load_file(dpath / "preprocess.safetensors").items()}
        x = (np.clip(np.float64(x_raw), -p["clamp"], p["clamp"]) - p["act_mean"]) / p["scalar"]
        pre_acts = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    h, a = pre_acts, np.maximum(pre_acts, 0)
    if cfg.sae.kind == "relu":
        return a
    if cfg.sae.kind == "topk":
        kth = -np.sort(-a, axis=1)[:, cfg.sae.k - 1 : cfg.sae.k]
        return np.where(a >= kth, a, 0)
    theta = np.float64(safetensors.numpy.load_file(dpath / "kind.safetensors")["threshold"])
    if cfg.sae.kind == "jumprelu":
        return np.where(h > theta, h, 0)
    return np.where(a > theta, a, 0)  # BatchTopK, Matryoshka: one threshold, repeated per latent


def raw_batch(n: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 4.0, size=(n, D)).astype(np.float32)


def reference_encode(W_enc, b_enc, b_dec, x, mean=0.0, scalar=1.0, clamp=np.inf):
    """SPEC 1 then SPEC 3's encoder, in float64 NumPy."""
    x = (np.clip(np.float64(x), -clamp, clamp) - mean) / scalar
    return np.maximum((x - np.float64(b_dec)) @ np.float64(W_enc) + np.float64(b_enc), 0.0)


def test_checkpoint_carries_its_preprocessing_and_encodes_raw(tmp_path):
    dpath = make_run(tmp_path)
    assert sorted(p.name for p in dpath.iterdir()) == [
        "cfg.json",
        "freqs.safetensors",
        "metrics.json",
        "preprocess.safetensors",
        "sae.safetensors",
    ]
    ckpt = sae_lib.load(dpath)
    assert isinstance(ckpt, checkpoint.Checkpoint) and ckpt.missing == ()
    p, s = ckpt.preprocess, ckpt.sae
    x = raw_batch()
    x[0, 0] = 80.0  # beyond the clamp
    ref_f = reference_encode(s.W_enc, s.b_enc, s.b_dec, x, np.asarray(p.act_mean), float(p.scalar), float(p.clamp))
    f = np.asarray(ckpt.encode_raw(x))
    np.testing.assert_allclose(f, ref_f, rtol=1e-5, atol=1e-5)
    assert (f > 0).any() and (f == 0).any()
    ref_x = (ref_f @ np.float64(s.W_dec) + np.float64(s.b_dec)) * float(p.scalar) + np.float64(p.act_mean)
    np.testing.assert_allclose(ckpt.decode_raw(f), ref_x, rtol=1e-5, atol=1e-4)
    x_hat, f2 = ckpt(x)
    np.testing.assert_array_equal(f2, f)
    assert ckpt.freqs.shape == (S,) and ckpt.cfg.lr == 1e-3


def test_old_checkpoint_loads_and_says_what_is_missing(tmp_path):
    dpath = make_run(tmp_path, stats=False)
    ckpt = sae_lib.load(dpath)
    assert ckpt.missing == ("preprocess", "freqs") and ckpt.preprocess is None
    with pytest.raises(config.InputError, match="no preprocessing statistics"):
        ckpt.encode_raw(raw_batch())
    ckpt = ckpt.with_preprocess(data.Preprocess(1e5, np.zeros(D, np.float32), 1.0))
    assert ckpt.missing == ("freqs",)
    s = ckpt.sae
    np.testing.assert_allclose(
        ckpt.encode_raw(raw_batch()), reference_encode(s.W_enc, s.b_enc, s.b_dec, raw_batch()), rtol=1e-5, atol=1e-5
    )


def test_fold_gives_our_features_and_raw_reconstructions(tmp_path):
    ckpt = sae_lib.load(make_run(tmp_path))
    w = checkpoint.fold(ckpt.sae, ckpt.preprocess)
    assert all(t.dtype == np.float32 for t in w.values())
    x = raw_batch()
    f = reference_encode(w["W_enc"], w["b_enc"], w["b_dec"], x)  # no preprocessing: raw in
    np.testing.assert_allclose(f, ckpt.encode_raw(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        f @ np.float64(w["W_dec"]) + w["b_dec"], ckpt.decode_raw(ckpt.encode_raw(x)), rtol=1e-5, atol=1e-4
    )
    # Decoder rows scale by s.
    s = float(ckpt.preprocess.scalar)
    np.testing.assert_allclose(
        np.linalg.norm(w["W_dec"], axis=1), s * np.linalg.norm(ckpt.sae.W_dec, axis=1), rtol=1e-6
    )


def write_sae_pt(fpath: pathlib.Path, header: dict, state: object) -> pathlib.Path:
    """A sae.pt as saev's nn.dump writes it: one JSON line, then torch.save."""
    fpath.parent.mkdir(parents=True, exist_ok=True)
    with open(fpath, "wb") as fd:
        fd.write((json.dumps(header) + "\n").encode())
        torch.save(state, fd)
    return fpath


def saev_state(d_vit: int = D, d_sae: int = S, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_vit, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_vit, generator=g), "b_dec": torch.randn(d_vit, generator=g),
    }  # fmt: skip


FULL_HEADER = {"d_vit": D, "exp_factor": S // D, "sparsity_coeff": 0.0004, "n_reinit_samples": 524288,
               "ghost_grads": False, "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 7}  # fmt: skip


@pytest.mark.parametrize(
    "header, expected",
    [
        (
            {"d_vit": D, "exp_factor": S // D, "l1_coeff": 8e-5, "use_ghost_grads": True},
            {"sparsity_coeff": 8e-5, "ghost_grads": True},
        ),
        (
            {"d_vit": D, "exp_factor": S // D, "sparsity_coeff": 8e-5, "ghost_grads": False},
            {"sparsity_coeff": 8e-5, "ghost_grads": False},
        ),
        (FULL_HEADER, {"sparsity_coeff": 0.0004, "seed": 7, "n_reinit_samples": 524288}),
    ],
    ids=["v1-l1_coeff", "v2-sparsity_coeff", "v3-full"],
)
def test_reads_every_saev_header_version(tmp_path, header, expected):
    state = saev_state()
    ckpt = sae_lib.load(write_sae_pt(tmp_path / "r" / "sae.pt", header, state))
    assert ckpt.missing == ("preprocess", "freqs", "cfg") and ckpt.cfg.sae.d_sae == S
    for key, value in expected.items():
        assert getattr(ckpt.cfg.sae, key) == value, key
    for name in sae_lib.TENSOR_NAMES:
        np.testing.assert_array_equal(getattr(ckpt.sae, name), state[name].numpy())
    # A directory holding sae.pt loads too; so does a sae.pt under any name.
    assert sae_lib.load(tmp_path / "r").cfg == ckpt.cfg
    (tmp_path / "r" / "sae.pt").rename(tmp_path / "other.bin")
    assert sae_lib.load(tmp_path / "other.bin").cfg == ckpt.cfg


def test_sae_pt_round_trip_is_byte_exact(tmp_path):
    """sae.pt -> saev_jax -> sae.pt gives back the same bytes (header and torch archive)."""
    src = tmp_path / "a.pt"
    with open(src, "wb") as fd:
        checkpoint.write_saev(
            fd, checkpoint.saev_header_to_cfg(FULL_HEADER, "test"), {k: v.numpy() for k, v in saev_state().items()}
        )
    assert src.read_bytes().startswith((json.dumps(FULL_HEADER) + "\n").encode())
    export.export(src, "saev", tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == src.read_bytes()
    # A directory export adds saev's cfg.json; reloading it gives the same header and tensors.
    export.export(src, "saev", tmp_path / "c")
    assert (tmp_path / "c" / "sae.pt").read_bytes() == src.read_bytes()
    assert sae_lib.load(tmp_path / "c").cfg.sae == checkpoint.saev_header_to_cfg(FULL_HEADER, "test")


def test_export_folds_and_reimports_as_raw_space(tmp_path):
    dpath = make_run(tmp_path)
    ckpt = sae_lib.load(dpath)
    export.export(dpath, "saev", tmp_path / "out")
    saev_cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert saev_cfg["data"]["scale_mean"] is False and saev_cfg["data"]["scale_norm"] is False
    back = sae_lib.load(tmp_path / "out")  # saev's cfg.json says no scaling: the statistics are known
    assert back.missing == ("freqs",) and float(back.preprocess.scalar) == 1.0
    x = raw_batch()
    np.testing.assert_allclose(back.encode_raw(x), ckpt.encode_raw(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back(x)[0], ckpt(x)[0], rtol=1e-5, atol=1e-4)


def test_export_peer_folders(tmp_path):
    dpath = make_run(tmp_path)
    ckpt = sae_lib.load(dpath)
    export.export(dpath, "saelens", tmp_path / "lens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"], cfg["normalize_activations"]) == (D, S, "standard", "none")
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    sparsity = safetensors.numpy.load_file(tmp_path / "lens" / "sparsity.safetensors")["sparsity"]
    np.testing.assert_allclose(sparsity, np.log10(np.asarray(ckpt.freqs, np.float64) + 1e-10), rtol=1e-6)
    w = safetensors.numpy.load_file(tmp_path / "lens" / "sae_weights.safetensors")
    for name, t in checkpoint.fold(ckpt.sae, ckpt.preprocess).items():
        np.testing.assert_array_equal(w[name], t)
    export.export(dpath, "sparsify", tmp_path / "sp")
    w = safetensors.numpy.load_file(tmp_path / "sp" / "sae.safetensors")
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert cfg["k"] == cfg["num_latents"] == S and cfg["d_in"] == D
    np.testing.assert_array_equal(w["encoder.weight"], checkpoint.fold(ckpt.sae, ckpt.preprocess)["W_enc"].T)


def test_sweep_directory_exports_every_run(tmp_path):
    sweep = tmp_path / "ckpt"
    runs = [make_run(sweep, f"run{i}", seed=i) for i in range(3)]
    (sweep / "wandb-queue").mkdir()  # not a checkpoint: skipped
    (sweep / "summary.csv").write_text("x\n")
    written = export.export(sweep, "sparsify", tmp_path / "out")
    assert [p.name for p in written] == ["run0", "run1", "run2"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run0", "run1", "run2"]
    for run in runs:
        ckpt = sae_lib.load(run)
        w = safetensors.numpy.load_file(tmp_path / "out" / run.name / "sae.safetensors")
        np.testing.assert_array_equal(w["b_dec"], checkpoint.fold(ckpt.sae, ckpt.preprocess)["b_dec"])


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned"
    fpath = tmp_path / "sae.pt"
    payload = {"W_enc": Evil(marker)}
    with open(fpath, "wb") as fd:
        fd.write((json.dumps(FULL_HEADER) + "\n").encode())
        if how == "torch.save":
            torch.save(payload, fd)
        else:
            pickle.dump(payload, fd)
    # The payload does run when unpickled plainly: the test would catch a loader that did.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(config.InputError, match=f"{fpath}: "):
        sae_lib.load(fpath)
    assert not marker.exists()


def bad_inputs(tmp_path: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(path, expected message) for every kind of bad checkpoint."""
    cases = []
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "text.pt").write_text("hello\nworld\n")
    cases.append((tmp_path / "text.pt", "first line is not a JSON header"))
    good = tmp_path / "good.pt"
    with open(good, "wb") as fd:  # as saev's nn.dump writes it
        checkpoint.write_saev(
            fd, checkpoint.saev_header_to_cfg(FULL_HEADER, "test"), {k: v.numpy() for k, v in saev_state().items()}
        )
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cases.append((tmp_path / "trunc.pt", "cannot read the tensors after the header"))
    cases.append(
        (write_sae_pt(tmp_path / "unknown.pt", FULL_HEADER | {"top_k": 3}, saev_state()), "unknown key 'top_k'")
    )
    cases.append(
        (
            write_sae_pt(tmp_path / "shape.pt", FULL_HEADER | {"exp_factor": 4}, saev_state()),
            r"W_enc has shape \[8, 24\], expected \[8, 32\]",
        )
    )
    cases.append(
        (write_sae_pt(tmp_path / "osu.pt", {"schema": 5, "cfg": {}}, saev_state()), "OSU-NLP-Group/saev, schema 5")
    )
    cases.append(
        (
            write_sae_pt(tmp_path / "keys.pt", FULL_HEADER, saev_state() | {"extra": torch.zeros(1)}),
            "unknown \\['extra'\\]",
        )
    )
    run = make_run(tmp_path, "run")
    st = (run / "sae.safetensors").read_bytes()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "sae.safetensors").write_bytes(st[: len(st) - 40])
    cases.append((tmp_path / "trunc", "not a valid safetensors file"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "not a checkpoint"))
    bad_cfg = make_run(tmp_path, "badcfg")
    (bad_cfg / "cfg.json").write_text(
        json.dumps(config.to_dict(config.Train(sae=config.SparseAutoencoder(d_vit=D, exp_factor=2))))
    )
    cases.append((bad_cfg, "W_enc is 8 x 24 but cfg.json says d_vit = 8, d_sae = 16"))
    return cases


def test_bad_checkpoints_raise_one_line(tmp_path):
    for path, match in bad_inputs(tmp_path):
        with pytest.raises(config.InputError, match=match) as info:
            sae_lib.load(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_export_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    run = make_run(tmp_path, "ok")
    cases = [(str(path), "saev", match) for path, match in bad_inputs(tmp_path / "bad")]
    cases += [(str(run), "onnx", "unknown format"), (str(tmp_path / "missing"), "saev", "no such checkpoint")]
    old = make_run(tmp_path, "old", stats=False)
    cases += [
        (str(old), "saelens", "no preprocessing statistics to fold"),
        (str(run), "saelens", "only --format saev writes a .pt"),
    ]
    for i, (src, fmt, match) in enumerate(cases):
        out = tmp_path / (f"out{i}.pt" if "writes a .pt" in match else f"out{i}")
        assert export.main([src, "--format", fmt, "--out", str(out)]) == 2, src
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match.replace("\\", "") in lines[0], (
            match,
            lines,
        )
        assert not out.exists() and not any(p.name.startswith(f".out{i}") for p in tmp_path.iterdir())
    assert export.main([str(run), "--format", "saelens", "--out", str(tmp_path / "fine")]) == 0
    assert (tmp_path / "fine" / "cfg.json").is_file()
    assert export.main([str(run), "--format", "saelens", "--out", str(tmp_path / "fine")]) == 2
    assert "exists already" in capsys.readouterr().err
    assert export.main([str(run), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: the following arguments are required: --format"]


def test_python_m_export(tmp_path):
    """The module entry point: status 2 and one line on bad input, 0 and the path on success."""
    good = tmp_path / "good.pt"
    with open(good, "wb") as fd:  # as saev's nn.dump writes it
        checkpoint.write_saev(
            fd, checkpoint.saev_header_to_cfg(FULL_HEADER, "test"), {k: v.numpy() for k, v in saev_state().items()}
        )
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:200])
    cmd = [sys.executable, "-m", "saev_jax.export"]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "trunc.pt"), "--format", "saev", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 2 and proc.stderr.count("\n") == 1 and "trunc.pt: cannot read the tensors" in proc.stderr
    ), proc.stderr
    assert not (tmp_path / "o").exists()
    proc = subprocess.run(
        [*cmd, str(good), "--format", "saev", "--out", str(tmp_path / "o.pt")], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "o.pt"), proc.stderr
    assert (tmp_path / "o.pt").read_bytes() == good.read_bytes()


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"])
def test_every_kind_loads_as_itself_and_encodes_raw(tmp_path, kind):
    dpath = make_kind_run(tmp_path, kind)
    ckpt = sae_lib.load(dpath)
    assert ckpt.kind == kind and type(ckpt.sae.sae) is kinds.KINDS[kind]
    x = raw_batch(64)
    f = np.asarray(ckpt.encode_raw(x))
    ref = reference_kind_encode(dpath, x)
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-5)
    assert 0.05 < (f > 0).mean() < 0.95
    if kind != "relu":  # its selection did something ReLU would not
        assert (f > 0).sum() < (ckpt.sae.sae.pre_acts(ckpt.preprocess(x)) > 0).sum()
    x_hat, f2 = ckpt(x)
    np.testing.assert_array_equal(f2, f)
    w = {k: np.float64(v) for k, v in safetensors.numpy.load_file(dpath / "sae.safetensors").items()}
    p = ckpt.preprocess
    np.testing.assert_allclose(
        x_hat, (ref @ w["W_dec"] + w["b_dec"]) * p.scalar + np.float64(p.act_mean), rtol=1e-5, atol=1e-4
    )


def saelens_reference_encode(out: pathlib.Path, x_raw: np.ndarray) -> np.ndarray:
    """SAELens v6's encoder for our exported folder, in NumPy (standard, topk, jumprelu)."""
    cfg = json.loads((out / "cfg.json").read_text())
    w = {k: np.float64(v) for k, v in safetensors.numpy.load_file(out / "sae_weights.safetensors").items()}
    h = (np.float64(x_raw) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input
    if cfg["architecture"] == "standard":
        return np.maximum(h, 0)
    if cfg["architecture"] == "topk":  # torch.topk on h, then ReLU on the kept values
        idx = np.argsort(-h, axis=1)[:, : cfg["k"]]
        f = np.zeros_like(h)
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(h, idx, axis=1), 0), axis=1)
        return f
    assert cfg["architecture"] == "jumprelu"
    return np.maximum(h, 0) * (h > w["threshold"])


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"])
def test_saelens_export_of_every_kind_encodes_raw_as_we_do(tmp_path, kind):
    """The folded export keeps the pre-activations (b_enc' = b_enc with b_dec subtracted first), so thresholds and k carry over unchanged."""
    dpath = make_kind_run(tmp_path, kind)
    ckpt = sae_lib.load(dpath)
    assert export.main([str(dpath), "--format", "saelens", "--out", str(tmp_path / "lens")]) == 0
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["architecture"] == export.SAELENS_ARCHITECTURES[kind]
    assert cfg.get("k") == (3 if kind == "topk" else None)
    w = safetensors.numpy.load_file(tmp_path / "lens" / "sae_weights.safetensors")
    assert ("threshold" in w) == (cfg["architecture"] == "jumprelu")
    x = raw_batch(64)
    # Folding leaves the pre-activations as they were.
    h_ours = np.asarray(ckpt.sae.sae.pre_acts(ckpt.preprocess(x)), np.float64)
    h_folded = (np.float64(x) - np.float64(w["b_dec"])) @ np.float64(w["W_enc"]) + np.float64(w["b_enc"])
    np.testing.assert_allclose(h_folded, h_ours, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(saelens_reference_encode(tmp_path / "lens", x), ckpt.encode_raw(x), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]["saev_jax"]["kind"] == kind


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_sparsify_export_has_the_kinds_k(tmp_path, kind):
    dpath = make_kind_run(tmp_path, kind)
    assert export.main([str(dpath), "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 0
    cfg = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert cfg["k"] == (3 if kind == "topk" else S) and cfg["num_latents"] == S


@pytest.mark.parametrize(
    ("kind", "fmt"),
    [
        ("batchtopk", "sparsify"),
        ("matryoshka", "sparsify"),
        ("jumprelu", "sparsify"),
        ("topk", "saev"),
        ("jumprelu", "saev"),
    ],
)
def test_a_kind_a_format_cannot_hold_is_refused(tmp_path, capsys, kind, fmt):
    sweep = tmp_path / "sweep"
    make_kind_run(sweep, "relu")
    make_kind_run(sweep, kind)
    assert export.main([str(sweep), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and f"a {kind} SAE cannot be exported as {fmt}" in err and str(sweep / kind) in err
    )
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
