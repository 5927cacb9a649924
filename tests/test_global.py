"""Global tensors in eager mode: placements, to_global / to_local / numpy, creation with
placement=, signature choice, autograd through global tensors, and the errors."""

from __future__ import annotations

import numpy as np
import pytest

import flowsys as fs
from flowsys import boxing, nn, optim
from flowsys.global_tensor import choose_signature
from flowsys.ops import OPS, Spec
from flowsys.sbp import broadcast, partial_sum, split

B, P, S = broadcast, partial_sum, split
P1 = fs.placement("cpu", [0, 1, 2])
P2x2 = fs.placement("cpu", [[0, 1], [2, 3]])


# --------------------------------------------------------------------------------- values


def test_placement_mesh_and_groups():
    p = fs.placement("cpu", [[4, 5, 6], [7, 8, 9]])
    assert p.mesh == (2, 3) and p.ndim == 2 and p.ranks == (4, 5, 6, 7, 8, 9)
    assert p.coords(8) == (1, 1) and p.rank_at((0, 2)) == 6
    assert p.group(8, along=0) == (5, 8) and p.group(8, along=1) == (7, 8, 9)
    assert p.groups(1) == [(4, 5, 6), (7, 8, 9)]
    assert p == fs.placement("cpu", [[4, 5, 6], [7, 8, 9]]) and hash(p) == hash(fs.placement("cpu", [[4, 5, 6], [7, 8, 9]]))
    assert p != fs.placement("cpu", [4, 5, 6, 7, 8, 9])
    assert repr(p) == "placement(type='cpu', ranks=[[4, 5, 6], [7, 8, 9]])"


@pytest.mark.parametrize("ranks", [[0, 0], [[0, 1], [2]], [-1, 0], [], "ab"])
def test_bad_placements_are_clear_errors(ranks):
    with pytest.raises(fs.PlacementError, match="placement"):
        fs.placement("cpu", ranks)
    with pytest.raises(fs.PlacementError, match="device type"):
        fs.placement("tpu", [0])


def test_sbp_values_print_and_are_frozen():
    assert (repr(S(1)), repr(B), repr(P)) == ("S(1)", "B", "P")
    assert S(0) == S(0) and S(0) != S(1) and hash(S(2)) == hash(S(2))
    with pytest.raises(AttributeError):
        S(0).axis = 1


# ------------------------------------------------------------------------- global tensors


def test_to_global_to_local_and_numpy_with_uneven_splits():
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    g = fs.tensor(x).to_global(P1, S(0))
    assert g.is_global and g.placement == P1 and g.sbp == (S(0),) and g.shape == (7, 4)
    assert g.sbp == S(0) and g.sbp != B, "on a 1-D mesh the SBP also equals its one value"
    assert [g.to_local(r).shape for r in P1.ranks] == [(3, 4), (2, 4), (2, 4)]  # np.array_split
    np.testing.assert_array_equal(g.to_local(1).numpy(), x[3:5])
    np.testing.assert_array_equal(g.numpy(), x)
    b = g.to_global(sbp=B)
    assert b.sbp == (B,) and all(np.array_equal(b.to_local(r).numpy(), x) for r in P1.ranks)
    p = g.to_global(sbp=P)
    np.testing.assert_array_equal(sum(p.to_local(r).numpy() for r in P1.ranks), x)
    assert not fs.tensor(x).is_global and fs.tensor(x).placement is None and fs.tensor(x).sbp is None


def test_2d_mesh_layout_nests_splits():
    x = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    g = fs.tensor(x).to_global(P2x2, (S(0), S(1)))
    np.testing.assert_array_equal(g.to_local(2).numpy(), x[2:, :3])
    h = fs.tensor(x).to_global(P2x2, (S(1), S(1)))  # columns halved, then halved again
    # rank 1 is (0, 1): columns 0..2 for the outer mesh axis, then the last of those 3 (2 + 1)
    np.testing.assert_array_equal(h.to_local(1).numpy(), x[:, 2:3])
    np.testing.assert_array_equal(h.numpy(), x)
    assert "sbp=(S(1), S(1))" in repr(h)


def test_creation_functions_take_placement_and_sbp():
    fs.manual_seed(3)
    local = fs.randn(8, 16)
    fs.manual_seed(3)
    g = fs.randn(8, 16, placement=P1, sbp=S(0))
    np.testing.assert_array_equal(g.numpy(), local.numpy())  # same logical samples
    assert g.to_local(0).shape == (3, 16)
    assert fs.zeros(4, 2, placement=P2x2, sbp=(S(0), B)).to_local(3).shape == (2, 2)
    assert fs.ones(3, placement=P1).sbp == (B,)
    assert fs.full((2, 2), 7.0, placement=P1, sbp=P).numpy().tolist() == [[7.0, 7.0], [7.0, 7.0]]
    assert fs.arange(5, placement=P1, sbp=S(0)).to_local(2).tolist() == [4]
    assert fs.ones_like(g).sbp == (S(0),) and fs.ones_like(g).numpy().sum() == 8 * 16
    w = fs.randn(3, 3, requires_grad=True, placement=P1, sbp=S(1))
    assert w.requires_grad and w.is_leaf
    with pytest.raises(fs.PlacementError, match="placement="):
        fs.zeros(2, sbp=S(0))


def test_ops_on_global_tensors_match_local_ones():
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    ga, gw = fs.tensor(a).to_global(P1, S(0)), fs.tensor(w).to_global(P1, B)
    y = fs.nn.functional.gelu(ga @ gw) * 2.0 + 1.0
    assert y.sbp == (S(0),), "a row-split input and a replicated weight keep rows split, with no boxing"
    ref = fs.nn.functional.gelu(fs.tensor(a) @ fs.tensor(w)) * 2.0 + 1.0
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-6)
    total = y.sum()
    assert total.sbp == (P,), "summing over the split axis leaves partial sums"
    assert total.item() == pytest.approx(ref.sum().item(), rel=1e-5)


# ----------------------------------------------------------------------- signature choice


def _choose(name, shapes, layouts, placement=P1, attrs=None, out_sbp=None):
    specs = tuple(Spec(s, np.dtype(np.float32)) for s in shapes)
    return choose_signature(OPS[name], specs, attrs or {}, layouts, placement, out_sbp)


def test_signature_choice_takes_the_least_boxing():
    assert _choose("matmul", [(6, 4), (4, 3)], [(S(0),), (B,)]).outs == ((S(0),),)
    assert _choose("matmul", [(6, 4), (4, 3)], [(B,), (S(1),)]).outs == ((S(1),),)
    sig = _choose("matmul", [(6, 4), (4, 3)], [(S(1),), (S(0),)])
    assert sig.outs == ((P,),) and sig.cost == 0
    # relu of a partial sum: reduce-scatter ((p-1)T) beats all-reduce (2(p-1)T)
    sig = _choose("relu", [(6, 4)], [(P,)])
    assert sig.ins[0] != (B,) and sig.cost == boxing.cost(P, S(0), 6 * 4 * 4, 3)


def test_signature_ties_prefer_the_unchanged_layout_then_the_earlier_row():
    # B -> S(0) is free, but keeping B changes nothing: B wins
    assert _choose("exp", [(6, 4)], [(B,)]).ins == ((B,),)
    # S(0) x S(1): every row moves something; the choice is deterministic
    first = _choose("add", [(6, 6), (6, 6)], [(S(0),), (S(1),)])
    assert all(_choose("add", [(6, 6), (6, 6)], [(S(0),), (S(1),)]) == first for _ in range(3))


def test_signature_choice_respects_an_output_constraint():
    sig = _choose("matmul", [(6, 4), (4, 3)], [(S(0),), (B,)], out_sbp=[(B,)])
    assert sig.outs == ((B,),) and sig.ins == ((B,), (B,))
    with pytest.raises(fs.SbpError, match="no signature"):
        _choose("exp", [(6, 4)], [(B,)], out_sbp=[(P,)])


def test_nd_signatures_are_per_mesh_axis_products():
    # data parallel on mesh axis 0, tensor parallel on axis 1
    sig = _choose("matmul", [(8, 4), (4, 6)], [(S(0), B), (B, S(1))], placement=P2x2)
    assert sig.outs == ((S(0), S(1)),) and sig.cost == 0
    sig = _choose("matmul", [(8, 4), (4, 6)], [(S(0), S(1)), (B, S(0))], placement=P2x2)
    assert sig.outs == ((S(0), P),) and sig.cost == 0


# ------------------------------------------------------------------------------ autograd


def test_gradient_of_a_replicated_input_used_under_split_is_a_partial_sum_reduced_at_the_leaf():
    rng = np.random.default_rng(1)
    x = fs.tensor(rng.standard_normal((6, 4)).astype(np.float32)).to_global(P1, S(0))
    w = fs.tensor(rng.standard_normal((4, 2)).astype(np.float32), requires_grad=True)
    wg = w.detach().to_global(P1, B).requires_grad_()
    with boxing.trace() as events:
        (x @ wg).sum().backward()
    assert wg.grad.sbp == (B,), "a leaf's gradient takes the leaf's layout"
    assert [e.kind for e in events if e.nbytes] == ["all_reduce"], "data parallelism's one all-reduce"
    (fs.tensor(x.numpy()) @ w).sum().backward()
    np.testing.assert_allclose(wg.grad.numpy(), w.grad.numpy(), rtol=1e-5)


def test_gradients_flow_through_to_global_to_a_local_leaf():
    x = fs.tensor(np.arange(6, dtype=np.float32).reshape(3, 2), requires_grad=True)
    g = x.to_global(P1, S(0))
    (g * g).sum().backward()
    assert not x.grad.is_global
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy())


def test_gradient_of_boxing_is_converted_back():
    x = fs.randn(6, 4, placement=P1, sbp=S(0), requires_grad=True)
    y = x.to_global(sbp=B)
    (y * 3.0).sum().backward()
    assert x.grad.sbp == (S(0),)
    np.testing.assert_allclose(x.grad.numpy(), np.full((6, 4), 3.0))


def test_moving_between_placements_is_differentiable():
    other = fs.placement("cpu", [5, 6])
    x = fs.randn(4, 4, placement=P1, sbp=S(0), requires_grad=True)
    y = x.to_global(other, S(1))
    assert y.placement == other
    (y * y).sum().backward()
    assert x.grad.placement == P1
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------ modules, optim


def test_module_to_global_with_a_plan_and_training_matches_local():
    fs.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    par = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    par.load_state_dict(ref.state_dict())
    par.to_global(P1, {"0.*": S(0), "2.weight": S(1)})
    assert par[0].weight.sbp == (S(0),) and par[0].bias.sbp == (S(0),)
    assert par[2].weight.sbp == (S(1),) and par[2].bias.sbp == (B,)
    opt_r = optim.AdamW(ref.parameters(), lr=1e-2)
    opt_p = optim.AdamW(par.parameters(), lr=1e-2)
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = rng.standard_normal((5, 4)).astype(np.float32)
        lr_ = (ref(fs.tensor(x)) ** 2).mean()
        lp = (par(fs.tensor(x).to_global(P1, B)) ** 2).mean()
        assert lp.item() == pytest.approx(lr_.item(), rel=1e-5)
        for opt, loss in ((opt_r, lr_), (opt_p, lp)):
            opt.zero_grad()
            loss.backward()
        assert optim.clip_grad_norm_(par.parameters(), 0.5) == pytest.approx(
            optim.clip_grad_norm_(ref.parameters(), 0.5), rel=1e-5)
        opt_r.step()
        opt_p.step()
    for (name, a), (_, b) in zip(ref.state_dict().items(), par.state_dict().items()):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_state_dict_of_a_global_module_is_logical_and_loads_back():
    fs.manual_seed(1)
    m = nn.Linear(4, 6)
    want = {k: v.numpy().copy() for k, v in m.state_dict().items()}
    m.to_global(P2x2, (S(0), B))
    assert {k: v.numpy().tolist() for k, v in m.state_dict().items()} == {k: v.tolist() for k, v in want.items()}
    m.load_state_dict({k: v * 2 for k, v in want.items()})
    assert m.weight.sbp == (S(0), B)
    np.testing.assert_allclose(m.weight.numpy(), want["weight"] * 2)


# -------------------------------------------------------------------------------- errors


def test_split_axis_out_of_range():
    with pytest.raises(fs.SbpError, match=r"S\(2\).*shape \(4, 4\)"):
        fs.ones(4, 4).to_global(P1, S(2))


def test_sbp_tuple_length_must_match_the_mesh():
    with pytest.raises(fs.SbpError, match=r"2 value\(s\).*mesh \(3,\)"):
        fs.ones(4, 4).to_global(P1, (S(0), B))
    with pytest.raises(fs.SbpError, match="one SBP per mesh axis"):
        fs.ones(4, 4).to_global(P2x2, (S(0),))


def test_binary_op_on_different_placements():
    a = fs.ones(4, placement=P1)
    b = fs.ones(4, placement=fs.placement("cpu", [3, 4]))
    with pytest.raises(fs.PlacementError, match=r"add: inputs are on different placements.*to_global\(placement="):
        a + b


def test_to_local_of_a_rank_outside_the_placement():
    g = fs.ones(4, placement=P1, sbp=S(0))
    with pytest.raises(fs.PlacementError, match=r"rank 7 is not in"):
        g.to_local(7)
    with pytest.raises(fs.PlacementError, match="not global"):
        fs.ones(4).to_local(0)


def test_local_to_global_needs_a_placement():
    with pytest.raises(fs.PlacementError, match="needs a placement"):
        fs.ones(4).to_global(sbp=S(0))
