"""Counter-based initialisation: any shard of a parameter, made by itself, is the slice of the
one-device value; eager, global and meta-then-materialised builds start from the same values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import flowsys as fs
from flowsys import nn
from flowsys.global_tensor import GlobalValue
from flowsys.layout import as_slices, holds_value, normalize_sbp, shard_box
from flowsys.models import GPT, GPTConfig
from flowsys.rng import InitSpec, all_shards, materialize, shard_values
from flowsys.sbp import broadcast, partial_sum, split

B, P, S = broadcast, partial_sum, split
SPECS = [InitSpec("normal", (0.5, 2.0), key=11), InitSpec("uniform", (-3.0, 1.0), key=2 ** 64 - 1),
         InitSpec("ones"), InitSpec("constant", (0.25,))]
LAYOUTS = [  # (ranks, sbp): 1-D, uneven, partial sums and 2-D meshes
    ([0, 1], S(0)), ([0, 1], S(1)), ([0, 1, 2], S(0)), ([0, 1, 2], S(1)), ([0, 1], B), ([0, 1, 2], P),
    ([[0, 1], [2, 3]], (S(0), S(1))), ([[0, 1], [2, 3]], (S(0), S(0))), ([[0, 1], [2, 3]], (S(1), B)),
    ([[0, 1], [2, 3]], (B, P)), ([[0, 1, 2], [3, 4, 5]], (S(1), S(1))), ([[0, 1, 2], [3, 4, 5]], (P, S(0))),
]
CFG = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=8)


# ---------------------------------------------------------------------------- the generator


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_every_block_is_the_slice_of_the_whole_tensor(spec, dtype):
    shape = (7, 5, 3)
    whole = materialize(spec, shape, dtype)
    assert whole.shape == shape and whole.dtype == np.dtype(dtype)
    for box in [((0, 7), (0, 5), (0, 3)), ((2, 5), (1, 4), (0, 3)), ((6, 7), (4, 5), (2, 3)), ((3, 3), (0, 5), (0, 3))]:
        np.testing.assert_array_equal(materialize(spec, shape, dtype, box), whole[as_slices(box)])


def test_values_are_set_by_key_and_logical_index_only():
    a = InitSpec("normal", (0.0, 1.0), key=5)
    flat = materialize(a, (60,), "float64")
    np.testing.assert_array_equal(materialize(a, (3, 4, 5), "float64").reshape(-1), flat)  # C-order index
    assert not np.array_equal(materialize(InitSpec("normal", (0.0, 1.0), key=6), (60,), "float64"), flat)
    # float32 is the float64 value rounded (normals) or truncated to 24 bits (uniforms: never 1)
    np.testing.assert_array_equal(materialize(a, (60,), "float32"), flat.astype(np.float32))
    u = InitSpec("uniform", (0.0, 1.0), key=5)
    np.testing.assert_array_less(materialize(u, (60,), "float64") - materialize(u, (60,), "float32"), 2.0 ** -24)
    assert materialize(a, (), "float32").shape == () and materialize(a, (0, 3), "float32").shape == (0, 3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normal_and_uniform_moments(dtype):
    n = 1_000_000
    z = materialize(InitSpec("normal", (1.5, 0.5), key=123), (n,), dtype).astype(np.float64)
    assert abs(z.mean() - 1.5) < 5 * 0.5 / math.sqrt(n) and abs(z.std() - 0.5) < 0.002
    s = (z - 1.5) / 0.5
    assert abs((s ** 3).mean()) < 0.01 and abs((s ** 4).mean() - 3.0) < 0.03  # skew 0, kurtosis 3
    assert abs((np.abs(s) < 1).mean() - 0.682689) < 0.002 and s.min() < -4.5 and s.max() > 4.5  # tails reached
    u = materialize(InitSpec("uniform", (-2.0, 4.0), key=9), (n,), dtype).astype(np.float64)
    assert u.min() >= -2.0 and u.max() < 4.0 and u.min() < -1.999 and u.max() > 3.999
    assert abs(u.mean() - 1.0) < 0.01 and abs(u.std() - 6 / math.sqrt(12)) < 0.005
    hist = np.histogram(u, bins=20, range=(-2.0, 4.0))[0]
    assert np.abs(hist - n / 20).max() < 6 * math.sqrt(n / 20)  # flat, within 6 sigma per bin


def test_uniform_stays_below_its_upper_bound_in_narrow_dtypes():
    # 1 - 2**-24 rounds up to 1 in float16; the bound is excluded all the same
    u = materialize(InitSpec("uniform", (0.0, 1.0), key=1), (200_000,), "float16")
    assert u.max() < 1.0 and u.dtype == np.float16


def test_a_large_tensor_is_generated_quickly():
    import time

    start = time.perf_counter()
    materialize(InitSpec("normal", (0.0, 0.02), key=1), (1024, 2048), "float32")
    assert time.perf_counter() - start < 1.0  # about 0.05 s here


def test_init_spec_round_trips_through_json_and_checks_its_numbers():
    for spec in SPECS + [InitSpec("zeros")]:
        d = json.loads(json.dumps(spec.as_dict()))
        assert InitSpec.from_dict(d) == spec
    assert InitSpec.from_dict({"kind": "normal", "params": [0, 1], "key": 2 ** 63 + 5}).key == 2 ** 63 + 5
    assert repr(InitSpec("normal", (0.0, 0.02), key=255)) == "normal(mean=0, std=0.02, key=0x00000000000000ff)"
    assert repr(InitSpec("zeros")) == "zeros()"
    for bad, words in [(lambda: InitSpec("gauss"), "unknown kind"), (lambda: InitSpec("normal", (0.0,)), "2 number"),
                       (lambda: InitSpec("normal", (0.0, -1.0)), "std >= 0"),
                       (lambda: InitSpec("uniform", (1.0, 0.0)), "low <= high"),
                       (lambda: InitSpec("normal", (0.0, 1.0), key=-1), "key"),
                       (lambda: InitSpec.from_dict({"kind": "ones", "seed": 1}), "expected keys")]:
        with pytest.raises(fs.ArgumentError, match=words):
            bad()
    with pytest.raises(fs.DTypeError, match="int64"):
        materialize(SPECS[0], (3,), "int64")
    with pytest.raises(fs.ShapeError, match=r"not inside a tensor of shape \(3, 4\)"):
        materialize(SPECS[0], (3, 4), "float32", ((0, 4), (0, 4)))


# ---------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("ranks,sbp", LAYOUTS, ids=lambda v: repr(v))
def test_each_rank_makes_its_own_shard_of_every_layout(ranks, sbp):
    spec, shape = SPECS[0], (7, 5)  # 7 and 5 are not divided by 2 or 3: uneven splits
    whole = materialize(spec, shape, "float32")
    placement = fs.placement("cpu", ranks)
    nd = normalize_sbp(sbp, placement, shape)
    shards = all_shards(spec, shape, "float32", placement, sbp)
    for rank, shard in zip(placement.ranks, shards):
        c = placement.coords(rank)
        expect = whole[as_slices(shard_box(shape, nd, placement.mesh, c))]
        expect = expect if holds_value(nd, c) else np.zeros_like(expect)
        np.testing.assert_array_equal(shard_values(spec, shape, "float32", ranks, sbp, rank), expect)
        np.testing.assert_array_equal(shard, expect)
    assert len({id(s) for s in shards}) == len(shards)  # replicas are copies, not one buffer
    np.testing.assert_array_equal(GlobalValue(placement, nd, shape, np.float32, shards).logical(), whole)


@pytest.mark.parametrize("ranks,sbp", LAYOUTS, ids=lambda v: repr(v))
def test_initialising_a_global_parameter_fills_each_shard_from_its_block(ranks, sbp):
    placement = fs.placement("cpu", ranks)
    fs.manual_seed(3)
    local = nn.init.uniform_(nn.Parameter(np.zeros((5, 7), np.float32)), -1.0, 1.0)
    fs.manual_seed(3)
    glob = nn.Parameter(fs.tensor(np.zeros((5, 7), np.float32)).to_global(placement, sbp))
    nn.init.uniform_(glob, -1.0, 1.0)
    assert glob.init == local.init
    np.testing.assert_array_equal(glob.numpy(), local.numpy())
    for rank in placement.ranks:
        np.testing.assert_array_equal(glob.to_local(rank).numpy(),
                                      shard_values(local.init, (5, 7), np.float32, placement, sbp, rank))


# ------------------------------------------------------------------------------------ models


def _values(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_the_same_seed_builds_the_same_model_and_another_seed_another():
    def build(seed):
        fs.manual_seed(seed)
        return _values(nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Embedding(9, 4)))

    a, b, c = build(0), build(0), build(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    np.testing.assert_array_equal(a["1.weight"], np.ones(5, np.float32))
    np.testing.assert_array_equal(a["1.bias"], np.zeros(5, np.float32))
    bound = 1 / math.sqrt(6)
    assert np.abs(a["0.weight"]).max() <= bound and np.abs(a["0.bias"]).max() <= bound


def test_every_gpt_parameter_records_the_gpt2_init():
    fs.manual_seed(0)
    model = GPT(CFG)
    for name, p in model.named_parameters():
        spec = p.init
        if name.endswith("c_proj.weight"):
            assert spec.kind == "normal" and spec.params == (0.0, 0.02 / math.sqrt(2 * CFG.n_layer)), name
        elif name.endswith("bias"):
            assert spec.kind == "zeros", name
        elif ".ln_" in name:
            assert spec.kind == "ones", name
        else:
            assert spec.kind == "normal" and spec.params == (0.0, 0.02), name
        np.testing.assert_array_equal(p.numpy(), materialize(spec, p.shape, p.dtype))
    keys = [p.init.key for p in model.parameters() if p.init.is_random]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("ranks,tp", [([0, 1], False), ([0, 1, 2], True), ([[0, 1], [2, 3]], True)])
def test_a_gpt_built_under_meta_init_materialises_to_the_eager_values(ranks, tp):
    placement = fs.placement("cpu", ranks)
    plan = GPT.parallel_plan(placement, dp_axis=0 if placement.ndim == 2 else None,
                             tp_axis=placement.ndim - 1 if tp else None)
    fs.manual_seed(7)
    eager = _values(GPT(CFG))
    fs.manual_seed(7)
    with nn.meta_init():
        model = GPT(CFG).to_global(placement, plan)
    assert model.transformer["wte"].weight._data._shards is None
    fs.manual_seed(7)
    with nn.meta_init():
        specs = {name: p.init for name, p in GPT(CFG).named_parameters()}
    # a worker's view: only (spec, shape, dtype, placement, SBP, rank) makes each shard
    for name, p in model.named_parameters():
        d = p._data
        assert p.init == specs[name]
        whole = eager[name].reshape(d.shape)
        for rank in placement.ranks:
            c = placement.coords(rank)
            expect = whole[as_slices(shard_box(d.shape, d.sbp, placement.mesh, c))]
            np.testing.assert_array_equal(shard_values(p.init, d.shape, d.dtype, placement, d.sbp, rank), expect)
    nn.init.materialize_(model)
    assert all(np.array_equal(v, eager[k]) for k, v in _values(model).items())
    fs.manual_seed(7)
    laid = GPT(CFG).to_global(placement, plan)  # eager, then laid out from the driver: the same shards
    for (name, p), q in zip(model.named_parameters(), laid.parameters()):
        for a, b in zip(p._data.shards, q._data.shards):
            np.testing.assert_array_equal(a, b)


def test_a_value_put_in_by_the_user_drops_the_init_spec():
    fs.manual_seed(0)
    src = nn.Linear(3, 2)
    dst = nn.Linear(3, 2)
    assert dst.weight.init is not None and dst.weight.init != src.weight.init
    dst.load_state_dict(src.state_dict())
    assert dst.weight.init is None and dst.bias.init is None
    other = nn.Linear(3, 2)
    other.weight.copy_(np.ones((2, 3), np.float32))
    assert other.weight.init is None and other.bias.init is not None
    # under meta_init, a parameter with its own values is laid out with them (no spec to make it)
    placement = fs.placement("cpu", [0, 1])
    with nn.meta_init():
        m = nn.Linear(3, 2)
        m.weight.copy_(np.full((2, 3), 2.0, np.float32))
        m.to_global(placement, S(0))
    assert m.weight._data._shards is not None and m.bias._data._shards is None
    nn.init.materialize_(m)
    np.testing.assert_array_equal(m.weight.numpy(), np.full((2, 3), 2.0, np.float32))


def test_materialising_a_parameter_without_values_or_spec_is_a_clear_error():
    placement = fs.placement("cpu", [0, 1])
    m = nn.Linear(3, 2)
    m.weight.init = None
    m.weight._data = GlobalValue(placement, (B,), (2, 3), np.float32, None)
    with pytest.raises(fs.ConfigError, match=r"weight \(2, 3\) has neither values nor an init spec"):
        nn.init.materialize_(m)
