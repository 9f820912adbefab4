"""`eval_n_patches`: evaluation on a seeded random subset of the shards, the same for every SAE."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from saev_jax import checkpoint, config, data, evaluate, evaluation, synthetic, train, training
from tests.test_evaluate import ALMOST_DEAD, DENSE, EXP, D, M, check_against_reference, make_preprocess, make_saes
from tests.test_evaluate import reference as numpy_reference

B = 16


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> data.Activations:
    root = tmp_path_factory.mktemp("shards")
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=16, k=2, n_imgs=40, n_patches_per_img=7, n_patches_per_shard=64)
    )
    data_cfg = config.DataLoad(shard_root=str(root), layer=-2, scale_mean=False, scale_norm=False, clamp=3.0)
    return data.Activations(data_cfg)


def make_cfg(acts: data.Activations, cap: int, **kw) -> config.Train:
    return config.Train(
        data=acts.cfg, sae=config.SparseAutoencoder(d_vit=D, exp_factor=EXP), sae_batch_size=B, n_workers=1,
        eval_n_patches=cap, **kw,
    )  # fmt: skip


def run(acts, cap: int, saes=None, **kw) -> list[evaluation.EvalMetrics]:
    saes = make_saes() if saes is None else saes
    n = saes.b_dec.shape[0]
    return evaluation.evaluate(
        [make_cfg(acts, cap, **kw)] * n, saes, acts, make_preprocess(),
        almost_dead_threshold=ALMOST_DEAD, dense_threshold=DENSE,
    )  # fmt: skip


@pytest.mark.slow
def test_cap_covers_exactly_n_random_examples_and_matches_numpy_on_them(acts):
    n_total, cap = len(acts), 37  # 37 = 2 * 16 + 5: the last batch is padded
    indices = evaluation.eval_indices(n_total, cap)
    # N distinct examples in order, spread over the set: not the first N (the patches of 5 images).
    assert indices.size == cap and np.all(np.diff(indices) > 0) and 0 <= indices[0] and indices[-1] < n_total
    assert len(np.unique(acts.image_i(indices))) > 20
    results = run(acts, cap)
    assert all(r.n_examples == cap for r in results)
    check_against_reference(results, numpy_reference(make_saes(), make_preprocess(), acts.read(indices)))


def test_same_subset_for_every_sae_and_every_run(acts):
    """A stack and each of its SAEs alone, and a config with another data seed, see the same examples."""
    together = run(acts, 50)
    saes = make_saes()
    for m in range(M):
        alone = run(acts, 50, saes=jax.tree.map(lambda leaf: leaf[m : m + 1], saes), seed=m + 7)
        np.testing.assert_array_equal(alone[0].freqs, together[m].freqs)
        np.testing.assert_allclose(alone[0].mse, together[m].mse, rtol=1e-6)
    assert np.array_equal(evaluation.eval_indices(len(acts), 50), evaluation.eval_indices(len(acts), 50))


def test_zero_or_a_cap_beyond_the_data_is_the_whole_set(acts):
    whole = run(acts, 0)
    beyond = run(acts, len(acts) + 1000)
    assert whole[0].n_examples == beyond[0].n_examples == len(acts)
    for a, b in zip(whole, beyond):
        np.testing.assert_array_equal(a.freqs, b.freqs)
        assert (a.mse, a.l0, a.quality) == (b.mse, b.l0, b.quality)
    assert evaluation.eval_indices(len(acts), 0) is None and evaluation.eval_indices(len(acts), len(acts)) is None


def test_quality_sampling_follows_the_capped_count(tmp_path):
    """On 8192 examples quality samples 1 in 2+ (stderr > 0); capped at 1000, every example (stderr exactly 0)."""
    synthetic.write_shards(
        tmp_path,
        synthetic.Synthetic(d_vit=D, n_features=16, k=2, n_imgs=1024, n_patches_per_img=8, n_patches_per_shard=2048),
    )
    big = data.Activations(config.DataLoad(shard_root=str(tmp_path), layer=-2, scale_mean=False, scale_norm=False))
    assert evaluation.quality_stride(len(big), 256) > 1 and evaluation.quality_stride(1000, 256) == 1
    saes = make_saes()
    one = jax.tree.map(lambda leaf: leaf[:1], saes)
    cfg = dataclasses.replace(make_cfg(big, 1000), sae_batch_size=256)
    (capped,) = evaluation.evaluate([cfg], one, big, make_preprocess())
    assert capped.n_examples == 1000 and capped.quality_stderr == 0.0


def test_negative_cap_is_one_line_before_anything_trains(tmp_path, acts):
    with pytest.raises(config.InputError) as err:
        config.validate(dataclasses.replace(make_cfg(acts, -5)))
    assert str(err.value) == "eval_n_patches = -5: must not be negative (0 evaluates on every example)"
    cfg = dataclasses.replace(make_cfg(acts, -5), ckpt_path=str(tmp_path / "ckpt"), track=False)
    with pytest.raises(config.InputError, match="^eval_n_patches = -5: "):
        training.main([cfg])
    assert not (tmp_path / "ckpt").exists()
    assert evaluate.main([str(tmp_path), "--eval-n-patches", "-1"]) == 2


def test_cap_splits_groups_but_not_their_names(acts):
    a, b = make_cfg(acts, 0), make_cfg(acts, 100)
    assert "eval_n_patches" in config.CANNOT_PARALLELIZE
    assert config.split_cfgs([a, b, a]) == [[a, a], [b]]
    # A resume may change the cap (evaluation follows training): the group keeps its snapshots' name.
    assert config.group_name([a]) == config.group_name([b])


@pytest.mark.slow
def test_training_and_the_evaluate_cli_evaluate_the_same_capped_subset(tmp_path):
    root = tmp_path / "shards"
    synthetic.write_shards(
        root, synthetic.Synthetic(d_vit=D, n_features=16, k=2, n_imgs=64, n_patches_per_img=8, n_patches_per_shard=256)
    )
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
n_patches = 1000
sae_batch_size = 64
track = false
n_workers = 1
eval_n_patches = 300
ckpt_path = "{tmp_path / "ckpt"}"
[data]
shard_root = "{root}"
n_random_samples = 256
[sae]
exp_factor = 2
sparsity_coeff = [1e-3, 1e-2]
n_reinit_samples = 128
""")
    ids = train.cli([str(sweep)])
    trained = [json.loads((tmp_path / "ckpt" / i / "metrics.json").read_text()) for i in ids]
    assert [m["n_examples"] for m in trained] == [300, 300]
    assert checkpoint.load_cfg(tmp_path / "ckpt" / ids[0]).eval_n_patches == 300
    # The evaluate CLI takes the cap from cfg.json: the same examples, the same numbers.
    assert evaluate.main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "ev")]) == 0
    for run_id, m in zip(ids, trained):
        again = json.loads((tmp_path / "ev" / run_id / "metrics.json").read_text())
        assert again["n_examples"] == 300 and again["l0"] == m["l0"]
        np.testing.assert_allclose(again["mse"], m["mse"], rtol=1e-5)  # float32 sums, chunked otherwise
    # --eval-n-patches overrides it; 0 is every example.
    assert evaluate.main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "all"), "--eval-n-patches", "0"]) == 0
    whole = json.loads((tmp_path / "all" / ids[0] / "metrics.json").read_text())
    assert whole["n_examples"] == 64 * 8
    assert pathlib.Path(tmp_path / "ev" / "summary.csv").is_file()
