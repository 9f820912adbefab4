import copy
import dataclasses
import pathlib

import pytest

from saev_jax import config

SAEV_SWEEP = {
    "lr": [3e-4, 1e-3, 3e-3],
    "sae": {"sparsity_coeff": [4e-4, 8e-4, 1.6e-3], "exp_factor": [16, 32]},
    "data": {"scale_mean": True},
}


def test_grid_order_and_count():
    cfgs = config.grid(config.Train(), SAEV_SWEEP)
    assert len(cfgs) == 18
    # First key slowest, last fastest; the [sae] table counts as one key, expanded the same way.
    expected = [
        (lr, coeff, exp)
        for lr in SAEV_SWEEP["lr"]
        for coeff in SAEV_SWEEP["sae"]["sparsity_coeff"]
        for exp in SAEV_SWEEP["sae"]["exp_factor"]
    ]
    assert [(c.lr, c.sae.sparsity_coeff, c.sae.exp_factor) for c in cfgs] == expected
    assert all(c.data.scale_mean is True for c in cfgs)


def test_grid_seeds():
    base = config.Train(seed=7, sae=config.SparseAutoencoder(seed=100))
    cfgs = config.grid(base, SAEV_SWEEP)
    assert [c.seed for c in cfgs] == [7 + d for d in range(18)]
    assert [c.sae.seed for c in cfgs] == [100 + 7 + d for d in range(18)]
    # A sweep that sets sae.seed uses it instead of the base's.
    cfgs = config.grid(base, {"sae": {"seed": 5, "sparsity_coeff": [1e-3, 2e-3]}})
    assert [c.sae.seed for c in cfgs] == [5 + 7 + 0, 5 + 7 + 1]


def test_grid_without_sae_table_keeps_sae_seed():
    base = config.Train(sae=config.SparseAutoencoder(seed=3))
    cfgs = config.grid(base, {"lr": [1e-4, 2e-4]})
    assert [c.sae.seed for c in cfgs] == [3, 3]
    assert [c.seed for c in cfgs] == [42, 43]


def test_grid_does_not_mutate_sweep():
    sweep = copy.deepcopy(SAEV_SWEEP)
    config.grid(config.Train(), sweep)
    assert sweep == SAEV_SWEEP


def test_grid_scalars_and_empty():
    cfgs = config.grid(config.Train(), {"ckpt_path": "/tmp/x", "track": False, "data": {"shard_root": "/s"}})
    assert len(cfgs) == 1 and cfgs[0].ckpt_path == "/tmp/x" and cfgs[0].data.shard_root == "/s"
    assert not cfgs[0].track
    assert config.grid(config.Train(), {}) == [dataclasses.replace(config.Train(), seed=42)]


def test_grid_int_for_float_field():
    (cfg,) = config.grid(config.Train(), {"lr": 1, "sae": {"sparsity_coeff": 0}})
    assert isinstance(cfg.lr, float) and isinstance(cfg.sae.sparsity_coeff, float)


@pytest.mark.parametrize(
    "sweep, key",
    [
        ({"learning_rate": [1e-3]}, "learning_rate"),
        ({"sae": {"sparsity": [1e-3]}}, "sparsity"),
        ({"data": {"layers": -1}}, "layers"),
    ],
)
def test_unknown_key_is_an_error_naming_it(sweep, key):
    with pytest.raises(config.InputError, match=f"'{key}'"):
        config.grid(config.Train(), sweep)


def test_wrong_type_is_an_error_naming_the_field():
    with pytest.raises(config.InputError, match="lr"):
        config.grid(config.Train(), {"lr": "fast"})


def test_split_cfgs():
    cfgs = config.grid(config.Train(), SAEV_SWEEP)
    groups = config.split_cfgs(cfgs)
    # Widths share a data stream (SPEC 2): saev's sweep (exp 16 and 32) is one group, read once.
    assert [len(g) for g in groups] == [18]
    assert groups[0] == cfgs
    # Things that may differ inside a group do.
    assert len({(c.lr, c.sae.sparsity_coeff, c.sae.seed, c.sae.exp_factor) for c in groups[0]}) == 18
    # Anything else in CANNOT_PARALLELIZE still splits.
    other = [dataclasses.replace(c, sae_batch_size=8) for c in cfgs[:3]]
    assert [len(g) for g in config.split_cfgs(cfgs + other)] == [18, 3]


def test_split_cfgs_first_seen_order_and_data():
    a = config.Train(data=config.DataLoad(layer=-1))
    b = config.Train(data=config.DataLoad(layer=-2))
    groups = config.split_cfgs([a, b, a, dataclasses.replace(b, lr=1.0)])
    assert [[c.data.layer for c in g] for g in groups] == [[-1, -1], [-2, -2]]


def test_check_groupable_names_keys():
    a = config.Train()
    b = dataclasses.replace(a, sae_batch_size=8, sae=dataclasses.replace(a.sae, d_vit=2))
    config.check_groupable([a, dataclasses.replace(a, lr=1.0, sae=dataclasses.replace(a.sae, exp_factor=2))])
    with pytest.raises(config.InputError, match="sae.d_vit, sae_batch_size"):
        config.check_groupable([a, b])


def test_load_sweep_errors(tmp_path: pathlib.Path):
    with pytest.raises(config.InputError, match="missing.toml"):
        config.load_sweep(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [1e-3,\n")
    with pytest.raises(config.InputError, match="bad.toml: invalid TOML"):
        config.load_sweep(bad)


def test_validate():
    with pytest.raises(config.InputError, match="ghost_grads"):
        config.validate(config.Train(sae=config.SparseAutoencoder(ghost_grads=True)))
    with pytest.raises(config.InputError, match="data.layer"):
        config.validate(config.Train(data=config.DataLoad(layer="last")))


def test_round_trip_dict():
    cfg = config.grid(config.Train(), SAEV_SWEEP)[5]
    assert config.from_dict(config.Train, config.to_dict(cfg)) == cfg


def test_a_narrow_relu_sae_is_not_checked_against_topk_k():
    """sae.k is TopK's: a ReLU SAE narrower than k's default validates (and a TopK one does not)."""
    narrow = config.SparseAutoencoder(d_vit=8, exp_factor=2)
    config.validate(config.Train(sae=narrow))
    with pytest.raises(config.InputError, match="sae.k = 32: must be at most d_sae = 16"):
        config.validate(config.Train(sae=dataclasses.replace(narrow, kind="topk")))
