"""MiLoRA's math core (docs/DESIGN.md §3) against its plain references and hand-made cases."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flora_hf.ops import build_lora_bank
from flora_hf.ops.milora import (
    POOLERS,
    RoutedGates,
    RouterParams,
    add_gated_lora,
    expert_row_scales,
    gated_lora_delta,
    gelu_rational_init,
    load_balance_loss,
    pool_prompt,
    rational,
    route,
    route_groups,
    route_prompts,
)
from flora_hf.ops.reference import (
    gated_lora_reference,
    pool_reference,
    rational_reference,
    route_groups_reference,
    route_reference,
)

FORMS = ["paper", "safe"]


# ------------------------------------------------------------------------------------------- rational activation
@pytest.mark.parametrize("form", FORMS)
def test_rational_init_fits_gelu_on_the_interval(form: str) -> None:
    a, b = gelu_rational_init(6, 5, form=form)
    assert a.dtype == b.dtype == torch.float32 and a.shape == (7,) and b.shape == (5,)
    x = torch.linspace(-3.0, 3.0, 12001)
    fast = (rational(x, a, b, form) - F.gelu(x)).abs().max().item()
    exact = (rational_reference(x, a, b, form) - F.gelu(x.double())).abs().max().item()
    assert fast <= 2e-4 and exact <= 2e-4, (fast, exact)


@pytest.mark.parametrize("form", FORMS)
def test_rational_gradients_reach_every_coefficient(form: str) -> None:
    a0, b0 = gelu_rational_init(form=form)
    x = torch.linspace(-3.0, 3.0, 101) + 0.013  # avoid x = 0 exactly, where |Q(x)| has no derivative
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for dtype in (torch.float32, torch.float64):
        a, b = a0.to(dtype).clone().requires_grad_(), b0.to(dtype).clone().requires_grad_()
        fn = rational if dtype == torch.float32 else rational_reference
        (fn(x.to(dtype), a, b, form) * upstream.to(dtype)).sum().backward()
        grads.append((a.grad, b.grad))
    (ga, gb), (ga_ref, gb_ref) = grads
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert (ga.abs() > 1e-6).all(), ga
    assert (gb.abs() > 1e-6).all(), gb
    torch.testing.assert_close(ga.double(), ga_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb.double(), gb_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rational_matches_reference_with_random_coefficients(form: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, generator=g) * 0.5, torch.randn(5, generator=g) * 0.5
    x = (torch.randn(4, 9, generator=g) * 2.5).to(dtype)  # also outside [-3, 3]
    y = rational(x, a, b, form)
    assert y.dtype == torch.float32  # evaluated in fp32 whatever the input
    torch.testing.assert_close(y.double(), rational_reference(x.float(), a, b, form), atol=1e-4, rtol=1e-5)


def test_rational_forms_differ_and_bad_form_is_an_error() -> None:
    a, b = torch.ones(3), torch.tensor([1.0, -1.0])
    x = torch.tensor([0.5, -2.0])
    # paper: 1 + |x - x²|; safe: 1 + |x| + x²
    torch.testing.assert_close(rational(x, a, b, "paper"), (1 + x + x**2) / (1 + (x - x**2).abs()))
    torch.testing.assert_close(rational(x, a, b, "safe"), (1 + x + x**2) / (1 + x.abs() + x**2))
    with pytest.raises(ValueError, match="'paper' or 'safe'"):
        rational(x, a, b, "padé")
    with pytest.raises(ValueError, match="degrees must be positive"):
        gelu_rational_init(0, 5)


# ------------------------------------------------------------------------------------------------------ pooling
def _prompt_batch(d: int = 8):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 7, d, generator=g)
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],  # no padding
            [0, 0, 0, 1, 1, 1, 1],  # left padding
            [1, 1, 1, 0, 0, 0, 0],  # right padding
            [0, 0, 1, 1, 0, 0, 0],  # prompt in the middle (padding on both sides / response masked)
            [0, 0, 0, 0, 0, 0, 1],  # a single token
        ],
        dtype=torch.bool,
    )
    return hidden, mask, torch.randn(d, generator=g)


@pytest.mark.parametrize("pooler", POOLERS)
def test_pool_prompt_matches_reference(pooler: str) -> None:
    hidden, mask, query = _prompt_batch()
    got = pool_prompt(hidden, mask, pooler, query)
    assert got.dtype == torch.float32 and got.shape == (5, 8)
    torch.testing.assert_close(got.double(), pool_reference(hidden, mask, pooler, query), atol=1e-6, rtol=1e-6)
    half = pool_prompt(hidden.half(), mask, pooler, query)
    torch.testing.assert_close(half.double(), pool_reference(hidden.half(), mask, pooler, query), atol=1e-3, rtol=0)


@pytest.mark.parametrize("pooler", POOLERS)
def test_pool_prompt_ignores_masked_tokens_and_padding_side(pooler: str) -> None:
    g = torch.Generator().manual_seed(4)
    prompt, query = torch.randn(4, 6, generator=g), torch.randn(6, generator=g)
    results = []
    for left, right in ((0, 0), (3, 0), (0, 3), (1, 2), (5, 0)):
        junk_l, junk_r = torch.randn(left, 6, generator=g) * 100, torch.randn(right, 6, generator=g) * 100
        hidden = torch.cat([junk_l, prompt, junk_r])[None]
        mask = torch.tensor([False] * left + [True] * 4 + [False] * right)[None]
        results.append(pool_prompt(hidden, mask, pooler, query)[0])
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pooler", POOLERS)
def test_row_without_prompt_pools_to_zeros(pooler: str) -> None:
    hidden, mask, query = _prompt_batch()
    mask[2] = False
    got = pool_prompt(hidden, mask, pooler, query)
    assert torch.isfinite(got).all()
    assert got[2].abs().max() == 0
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(got[keep].double(), pool_reference(hidden[keep], mask[keep], pooler, query))


def test_pool_prompt_bad_arguments() -> None:
    hidden, mask, _ = _prompt_batch()
    with pytest.raises(ValueError, match="query vector"):
        pool_prompt(hidden, mask, "attention")
    with pytest.raises(ValueError, match="unknown pooler 'first'"):
        pool_prompt(hidden, mask, "first")


# ------------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("top_k", [1, 3, 7, 9])
def test_route_matches_reference(form: str, top_k: int) -> None:
    g = torch.Generator().manual_seed(5)
    pooled, weight = torch.randn(6, 16, generator=g) * 3 + 1, torch.randn(7, 16, generator=g)
    a, b = gelu_rational_init(form=form)
    for num, den in ((a, b), (a + 0.1 * torch.randn(7, generator=g), b + 0.1 * torch.randn(5, generator=g))):
        probs, gates = route(pooled, weight, num, den, top_k, form)
        expected = route_reference(pooled, weight, num, den, top_k, form)
        torch.testing.assert_close(gates.double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(-1), torch.ones(6))
        assert ((gates != 0).sum(-1) == min(top_k, 7)).all()
        torch.testing.assert_close(gates[gates != 0], probs[gates != 0])  # selected experts weighted by their p


def test_route_is_invariant_to_the_scale_of_the_pooled_state() -> None:
    # The parameter-free layer norm keeps the rational on the range its GELU fit was made for.
    g = torch.Generator().manual_seed(6)
    pooled, weight = torch.randn(3, 16, generator=g), torch.randn(4, 16, generator=g)
    a, b = gelu_rational_init()
    _, gates = route(pooled, weight, a, b, 2)
    _, scaled = route(pooled * 50 + 7, weight, a, b, 2)
    torch.testing.assert_close(scaled, gates, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- load balancing
@pytest.mark.parametrize("n", [2, 4, 7])
def test_load_balance_loss_extremes(n: int) -> None:
    balanced = torch.eye(n)  # each prompt to a different expert, with certainty
    assert load_balance_loss(balanced).item() == pytest.approx(1.0)
    assert load_balance_loss(torch.full((5, n), 1.0 / n)).item() == pytest.approx(1.0)  # uniform probabilities
    collapsed = F.one_hot(torch.full((5,), n - 1), n).float()  # every prompt to the last expert, with certainty
    assert load_balance_loss(collapsed).item() == pytest.approx(float(n))


def test_load_balance_loss_worked_example() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]], requires_grad=True)
    # argmax 0, 1, 0, 2 -> f = (1/2, 1/4, 1/4); p̄ = (1.4, 1.3, 1.3) / 4
    # L = 3 (0.5·0.35 + 0.25·0.325 + 0.25·0.325) = 3 · 0.3375 = 1.0125
    loss = load_balance_loss(probs)
    assert loss.item() == pytest.approx(1.0125, abs=1e-6)
    loss.backward()
    # the argmax counts are not differentiable; dL/dp[b, i] = N f_i / B through p̄ only
    expected = (3 * torch.tensor([0.5, 0.25, 0.25]) / 4).expand(4, 3)
    torch.testing.assert_close(probs.grad, expected)


# ------------------------------------------------------------------------------------------------------ experts
def _bank(d_in: int = 10, d_out: int = 6):
    g = torch.Generator().manual_seed(7)
    adapters = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 2.0 / r) for r in (2, 3)]
    return build_lora_bank(adapters, d_in, d_out)


@pytest.mark.parametrize("shape", [(5, 10), (5, 4, 10)], ids=["decode", "prefill"])
def test_gated_lora_delta_matches_reference(shape) -> None:
    bank_a, bank_b = _bank()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(*shape, generator=g)
    indices = torch.tensor([1, 2, 2, 0, 1])
    gate = torch.tensor([0.5, 0.0, 0.25, 0.9, 0.0])
    full = gated_lora_delta(x, bank_a, bank_b, indices, gate)
    expected = gated_lora_reference(x, bank_a, bank_b, indices, gate)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    rows = (gate != 0).nonzero(as_tuple=True)[0]
    torch.testing.assert_close(gated_lora_delta(x, bank_a, bank_b, indices, gate, rows), expected, atol=1e-5, rtol=0)
    # rows is the contract: a row left out is not computed, whatever its gate says
    subset = torch.tensor([2])
    only_two = gated_lora_delta(x, bank_a, bank_b, indices, gate, subset)
    masked = gated_lora_reference(x, bank_a, bank_b, indices, gate * F.one_hot(subset, 5).sum(0))
    torch.testing.assert_close(only_two, masked, atol=1e-5, rtol=0)
    empty = gated_lora_delta(x, bank_a, bank_b, indices, gate, torch.empty(0, dtype=torch.long))
    assert empty.shape == (*shape[:-1], 6) and empty.abs().max() == 0


@pytest.mark.parametrize("shape", [(5, 10), (5, 3, 10)], ids=["decode", "prefill"])
def test_add_gated_lora_writes_only_selected_rows(shape) -> None:
    bank_a, bank_b = _bank()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(*shape, generator=g), torch.randn(*shape[:-1], 6, generator=g)
    indices = torch.tensor([1, 2, 2, 0, 1])
    gate = torch.tensor([0.5, 0.0, 0.25, 0.9, 0.0])
    expected = y + gated_lora_reference(x, bank_a, bank_b, indices, gate)
    rows = (gate != 0).nonzero(as_tuple=True)[0]
    torch.testing.assert_close(
        add_gated_lora(y.clone(), x, bank_a, bank_b, indices, gate), expected, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        add_gated_lora(y.clone(), x, bank_a, bank_b, indices, gate, rows), expected, atol=1e-5, rtol=0
    )
    untouched = y.clone()
    assert add_gated_lora(untouched, x, bank_a, bank_b, indices, gate, torch.empty(0, dtype=torch.long)) is untouched
    # one adapter for every row (indices None): its own factors, same result as bank row 1 for all rows
    ones = torch.ones(5, dtype=torch.long)
    single = gated_lora_reference(x, bank_a, bank_b, ones, gate)
    torch.testing.assert_close(gated_lora_delta(x, bank_a[1], bank_b[1], None, gate), single, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        add_gated_lora(y.clone(), x, bank_a[1], bank_b[1], None, gate, rows), y + single, atol=1e-5, rtol=0
    )


def test_gated_lora_delta_gradients_flow_to_gates_and_factors() -> None:
    d_in, d_out = 10, 6
    a, b = torch.randn(2, d_in, requires_grad=True), torch.randn(d_out, 2, requires_grad=True)
    gate = torch.tensor([0.4, 0.0, 0.7], requires_grad=True)
    bank_a, bank_b = build_lora_bank([(a, b, 1.0)], d_in, d_out)
    x = torch.randn(3, 4, d_in)
    rows = torch.tensor([0, 2])
    delta = gated_lora_delta(x, bank_a, bank_b, torch.ones(3, dtype=torch.long), gate, rows)
    delta.sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert gate.grad[0] != 0 and gate.grad[2] != 0 and gate.grad[1] == 0


def test_routed_gates_rows_and_reordering() -> None:
    gates = torch.tensor([[0.5, 0.0, 0.2], [0.3, 0.6, 0.0], [0.1, 0.0, 0.9]])
    routed = RoutedGates(gates)
    assert routed.rows(0) is None  # on for every row: no index_select needed
    assert routed.rows(1).tolist() == [1]
    assert routed.rows(2).tolist() == [0, 2]
    torch.testing.assert_close(routed.column(2), gates[:, 2])
    picked = routed.index_select(torch.tensor([2, 2, 1]))
    torch.testing.assert_close(picked.gates, gates[[2, 2, 1]])
    assert picked.rows(1).tolist() == [2] and picked.rows(2).tolist() == [0, 1]
    repeated = routed.repeat_interleave(2)
    torch.testing.assert_close(repeated.gates, gates[[0, 0, 1, 1, 2, 2]])
    assert repeated.rows(1).tolist() == [2, 3]


# --------------------------------------------------------------------------------------- routing several adapters
def _router(n: int, d: int, top_k: int, pooler: str, form: str = "paper", seed: int = 10) -> RouterParams:
    g = torch.Generator().manual_seed(seed)
    a, b = gelu_rational_init(form=form)
    return RouterParams(
        weight=torch.randn(n, d, generator=g),
        numerator=a + 0.05 * torch.randn(a.shape, generator=g),
        denominator=b + 0.05 * torch.randn(b.shape, generator=g),
        top_k=top_k,
        pooler=pooler,
        form=form,
        query=torch.randn(d, generator=g) if pooler == "attention" else None,
    )


def _two_adapter_groups(d: int = 8):
    first = (_router(3, d, 2, "mean", seed=11), torch.tensor([0, 2, 3]), torch.tensor([0, 2, 4]))
    second = (_router(2, d, 1, "attention", "safe", seed=12), torch.tensor([4, 1]), torch.tensor([5, 1]))
    return [first, second]


def test_route_groups_two_adapters_on_disjoint_rows_and_columns() -> None:
    hidden, mask, _ = _prompt_batch()
    groups = _two_adapter_groups()
    gates, probs = route_groups(hidden, mask, groups, 7)
    assert gates.shape == (5, 7) and gates.dtype == torch.float32
    torch.testing.assert_close(gates.double(), route_groups_reference(hidden, mask, groups, 7), atol=1e-5, rtol=1e-5)
    assert gates[:, [3, 6]].abs().max() == 0  # columns of no adapter
    assert gates[[1, 4]][:, [0, 2, 4]].abs().max() == 0 and gates[[0, 2, 3]][:, [5, 1]].abs().max() == 0
    assert ((gates != 0).sum(-1) == torch.tensor([2, 1, 2, 2, 1])).all()  # each row its adapter's top-k
    assert [p.shape for p in probs] == [(3, 3), (2, 2)]
    for p, (router, rows, _) in zip(probs, groups):
        expected, _ = route_prompts(hidden[rows], mask[rows], router)
        torch.testing.assert_close(p, expected)


def test_route_groups_over_every_row() -> None:
    hidden, mask, _ = _prompt_batch()
    groups = [
        (_router(3, 8, 2, "last", seed=13), None, torch.tensor([3, 0, 1])),
        (_router(2, 8, 2, "max", "safe", seed=14), torch.tensor([2]), torch.tensor([4, 2])),
    ]
    gates, probs = route_groups(hidden, mask, groups, 5)
    torch.testing.assert_close(gates.double(), route_groups_reference(hidden, mask, groups, 5), atol=1e-5, rtol=1e-5)
    assert ((gates[:, [3, 0, 1]] != 0).sum(-1) == 2).all()
    assert gates[[0, 1, 3, 4]][:, [4, 2]].abs().max() == 0
    assert [p.shape for p in probs] == [(5, 3), (1, 2)]


def _trainable(router: RouterParams) -> RouterParams:
    query = None if router.query is None else router.query.clone().requires_grad_()
    return replace(
        router,
        weight=router.weight.clone().requires_grad_(),
        numerator=router.numerator.clone().requires_grad_(),
        denominator=router.denominator.clone().requires_grad_(),
        query=query,
    )


def test_route_groups_gradients_reach_each_router() -> None:
    hidden, mask, _ = _prompt_batch()
    groups = _two_adapter_groups() + [(_router(2, 8, 1, "last", seed=15), None, torch.tensor([3, 6]))]
    groups = [(_trainable(router), rows, columns) for router, rows, columns in groups]
    routers = [router for router, _, _ in groups]
    weights = [router.weight for router in routers]
    others = [routers[0].numerator, routers[1].denominator, routers[1].query]
    upstream = torch.randn(5, 7, generator=torch.Generator().manual_seed(16))
    gates, _ = route_groups(hidden, mask, groups, 7)
    grads = torch.autograd.grad((gates * upstream).sum(), weights + others)
    reference = route_groups_reference(hidden, mask, groups, 7)
    expected = torch.autograd.grad((reference * upstream.double()).sum(), weights + others)
    for grad, want in zip(grads, expected):
        assert torch.isfinite(grad).all() and grad.abs().max() > 0
        torch.testing.assert_close(grad.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_expert_row_scales_put_one_on_lora_rows() -> None:
    gates = torch.tensor([[0.5, 0.0, 0.2], [0.3, 0.6, 0.0], [0.1, 0.0, 0.9], [0.0, 0.0, 0.0]])
    lora_rows = torch.tensor([False, True, False, True])
    scales = expert_row_scales(gates, lora_rows)
    torch.testing.assert_close(scales[[1, 3]], torch.ones(2, 3))
    torch.testing.assert_close(scales[[0, 2]], gates[[0, 2]])
    assert torch.equal(expert_row_scales(gates, None), gates)
