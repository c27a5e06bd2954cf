"""The zoo's precision policy: bf16 operands with fp32 sums where declared safe, fp32 everywhere else.

Every zoo attention declares a `PrecisionPolicy`; `operand_dtype` decides per call (CUDA by default, the CPU
inside `bf16_devices`, which is how these CPU tests run the GPU's bf16 path; its fp32 accumulation runs
through the CPU twin of `matmul_fp32`). Checked here against first principles:

* bf16-declared cores stay within a stated bf16 error bound of a float64 oracle on the same (bf16) inputs,
  also under stress (large q/k norms, N = 3137 sums, heavy peaking), and stay finite;
* their sums really accumulate in fp32 (every matmul / sum they run returns fp32, from bf16 operands);
* the GPU kernel (``bmm(out_dtype=float32)``) has the shapes and dtype of its CPU twin (meta tensors), and
  its hand-written backward the gradient of the fp32 product;
* attentions declared fp32 stay fp32, and where a reason is numerical, a test shows the failure.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnxfer.models.attention.numerics import (
    FP32_CORE,
    bf16_devices,
    bmm_fp32_out,
    matmul_fp32,
    matmul_split,
    matmul_split_left,
    operand_dtype,
    split_bf16,
)
from attnxfer.models.efficient import create_attention, list_attentions
from attnxfer.models.efficient.base import precision_policies
from attnxfer.models.efficient.kernels import ELUFeatures, linear_readout, linear_state
from attnxfer.models.efficient.nystrom import iterative_pinv

#: Each registered zoo attention's declared policy: no list here to keep, a new attention is in every test below.
POLICIES = precision_policies()
BF16_SAFE = sorted(n for n, p in POLICIES.items() if p.uses_bf16)
FP32_ONLY = sorted(
    n for n, p in POLICIES.items() if not p.uses_bf16
)  # `none`: nothing computed, nothing in bf16
#: bf16's unit roundoff (8 significant bits): the largest relative error of one rounding.
U = 2.0**-8
#: Error bound of a bf16 core in units of U times the output's scale S (`test_bf16_core_matches_the_fp64_oracle`).
TOLERANCE_UNITS = 4

SMALL = {
    "window": dict(window_size=2),
    "agent": dict(agent_grid=(2, 3), bias_grid=3),
    "nystrom": dict(num_landmarks=5),
    "performer": dict(num_features=64, feature_seed=0),
    "focused_linear": dict(kernel_size=3),
    "window_linear": dict(window_size=2),
}
LARGE = {
    "window": dict(window_size=7),
    "window_linear": dict(window_size=7),
    "nystrom": dict(num_landmarks=32),
}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py


def build(name: str, grid: tuple[int, int], dim: int = 64, heads: int = 2, seed: int = 0):
    """An attention with a class token and ``grid``; new parameters moved off their init the way training
    moves them (relative to their scale, plus a little everywhere), so no check is trivially exact."""
    n = 1 + grid[0] * grid[1]
    options = dict((SMALL if n < 200 else LARGE).get(name, {}))
    if name == "linformer":
        options.update(seq_len=n, proj_len=8 if n < 200 else 64)
    torch.manual_seed(seed)
    module = create_attention(
        name, dim=dim, num_heads=heads, qkv_bias=True, num_prefix_tokens=1, grid_size=grid, **options
    ).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname in module.new_parameter_names():
            p = module.get_parameter(pname)
            noise = torch.randn(p.shape, generator=generator)
            p.mul_(1 + 0.3 * noise).add_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def bf16_qkv(module, n: int, qk_scale: float, batch: int = 2, seed: int = 0):
    """q, k, v as bf16 autocast hands them to the core (q and k scaled up for stress)."""
    torch.manual_seed(seed)
    x = torch.randn(batch, n, module.qkv.in_features)
    with torch.no_grad():
        qkv = module.project(x)
    return tuple((qkv[c] * (qk_scale if c in "qk" else 1.0)).bfloat16() for c in "qkv")


def oracle(module, q, k, v) -> torch.Tensor:
    """The core in float64 on the same (bf16-valued) inputs."""
    double = module.double()
    try:
        with torch.no_grad():
            return double.attend(q.double(), k.double(), v.double())
    finally:
        module.float()


def output_scale(module, q, k, v) -> float:
    """S, the output's size without cancellation: the core applied to |v| (a map with non-negative entries
    gives sum_j A_ij |v_j|); for Linformer, whose signed map is s F, with |F| (rounding F v costs
    u s |F| |v|); for Hydra, which has no map, applied to |q|, |k|, |v|."""
    if not module.map_kind.has_map:
        return oracle(module, q.abs(), k.abs(), v.abs()).abs().max().item()
    if hasattr(module, "seq_proj_v"):
        module = copy.deepcopy(module)
        module.seq_proj_v.data.abs_()
    return oracle(module, q, k, v.abs()).abs().max().item()


# ----------------------------------------------------------------------------- the policy, as data


def test_every_zoo_attention_declares_its_policy_and_why():
    """Each policy is checked by what it claims: a bf16 one against the fp64 oracle within 4 bf16 units
    (`test_bf16_core_matches_the_fp64_oracle`), an fp32 one for computing exactly its fp32 result with bf16
    enabled (`test_fp32_attentions_ignore_bf16_devices`); both lists are the registry's."""
    assert BF16_SAFE and FP32_ONLY
    for name, policy in POLICIES.items():
        assert policy.why, f"{name} must say why its policy is what it is"
        assert policy.fp32, f"{name}: every core keeps some part in fp32 (sums, normalisers)"
    assert set(POLICIES) == set(list_attentions()) - {"softmax"}


def test_operand_dtype_is_bf16_only_where_device_inputs_and_policy_agree():
    policy = precision_policies()["relu_linear"]
    bf16, fp32, fp16 = (torch.ones(2, dtype=d) for d in (torch.bfloat16, torch.float32, torch.float16))
    assert operand_dtype(bf16, policy) == torch.float32  # CPU: fp32 unless asked
    with bf16_devices("cpu"):
        assert operand_dtype(bf16, policy) == torch.bfloat16
        assert operand_dtype(fp32, policy) == torch.float32
        assert operand_dtype(fp16, policy) == torch.float32  # fp16: a long sum leaves its range
        assert operand_dtype(bf16, FP32_CORE) == torch.float32
        assert operand_dtype(bf16.double(), policy) == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert operand_dtype(fp32, policy) == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.float16):
            assert operand_dtype(fp32, policy) == torch.float32
    assert operand_dtype(bf16, policy) == torch.float32  # restored after the block


# ----------------------------------------------------------------------------- accuracy against the oracle

STRESS = [
    pytest.param((4, 5), 1.0, id="N21"),
    pytest.param((4, 5), 8.0, id="N21-peaked"),  # q, k x 8: logits x 64, near one-hot rows
    pytest.param((56, 56), 1.0, id="N3137"),  # every key/value sum runs over 3137 tokens
    pytest.param((56, 56), 6.0, id="N3137-large-norms"),
]


#: Where the bf16 cores run: the CPU (its twin of ``bmm(out_dtype=float32)``) and, where there is one, CUDA (the
#: kernel itself: `benchmarks/gpu_suite.sh check` runs this module on the GPU).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid, qk_scale", STRESS)
@pytest.mark.parametrize("name", BF16_SAFE)
def test_bf16_core_matches_the_fp64_oracle(name, grid, qk_scale, device):
    """|bf16 core - float64 core| <= 4 u S, u = 2^-8 (bf16's unit roundoff), S the output's scale without
    cancellation.

    Why 4: rounding the output to bf16 costs at most u S; the features (or scores) and the read-out's
    state are each rounded once (at most u each, relative, on non-negative weights), and every sum
    accumulates in fp32, so nothing grows with N. Flash attention in bf16 has the same kind of bound (its
    probabilities are rounded to bf16 before the product with v). A bf16 accumulation of the N = 3137 sums
    would be off by up to N u / 2 (~6 S) and fail it by far; so would a bf16-rounded exponent (Performer,
    Linformer's logits: an error of L u in a logit of size L).
    """
    module = build(name, grid)
    n = 1 + grid[0] * grid[1]
    q, k, v = bf16_qkv(module, n, qk_scale)
    expected = oracle(module, q, k, v)
    scale = output_scale(module, q, k, v)
    with torch.no_grad(), bf16_devices("cpu", "cuda"):
        got = module.to(device).attend(*(t.to(device) for t in (q, k, v))).cpu()
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    error = (got.double() - expected).abs().max().item()
    assert error <= TOLERANCE_UNITS * U * scale, f"{name}: error {error / (U * scale):.2f} bf16 units"


@pytest.mark.parametrize("name", BF16_SAFE)
def test_bf16_core_stays_finite_at_extreme_logits(name):
    """q, k x 30 (logits in the thousands): exponentials, features and normalisers must not overflow."""
    module = build(name, (4, 5))
    q, k, v = bf16_qkv(module, 21, 30.0)
    with torch.no_grad(), bf16_devices("cpu"):
        out = module.attend(q, k, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer = module(100 * torch.randn(2, 21, 64))
    assert torch.isfinite(out).all() and torch.isfinite(layer).all()


def test_autocast_runs_the_bf16_path_and_the_cpu_default_stays_fp32():
    module = build("relu_linear", (4, 5))
    x = torch.randn(2, 21, 64)
    with torch.no_grad():
        fp32 = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            default = module.attend(*(t.float() for t in bf16_qkv(module, 21, 1.0)))
            with bf16_devices("cpu"):
                bf16 = module(x)
    assert default.dtype == torch.float32  # fp32 inputs on the CPU: the fp32 core, as before
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- fp32 accumulation, seen


class MatmulLog(TorchDispatchMode):
    """Records every matmul and sum: (op, operand dtypes, whether operands hold bf16 values, output dtype)."""

    OPS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.sum", "aten.mean")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name.startswith(self.OPS):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            bf16_valued = all(torch.equal(t, t.bfloat16().to(t.dtype)) for t in tensors)
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.calls.append((name, tuple(t.dtype for t in tensors), bf16_valued, outs[0].dtype))
        return out


@pytest.mark.parametrize("name", [n for n in BF16_SAFE if n != "window"])  # window: one SDPA call
def test_bf16_cores_multiply_bf16_values_and_sum_in_fp32(name):
    """Every matmul the bf16 core runs takes bf16 values (its operands were rounded) and returns fp32; every
    sum returns fp32. On a GPU the same calls are ``bmm(out_dtype=float32)``; here the CPU twin upcasts."""
    module = build(name, (4, 5))
    q, k, v = bf16_qkv(module, 21, 2.0)
    with torch.no_grad(), bf16_devices("cpu"), MatmulLog() as log:
        module.attend(q, k, v)
    matmuls = [c for c in log.calls if not c[0].startswith(("aten.sum", "aten.mean"))]
    assert matmuls or name == "hydra", f"{name} ran no matmul"
    for op, dtypes, _, out_dtype in log.calls:
        assert out_dtype == torch.float32, f"{name}: {op} {dtypes} returned {out_dtype}"
    for op, dtypes, bf16_valued, _ in matmuls:
        if op.startswith(("aten.mm", "aten.bmm")):
            assert bf16_valued, f"{name}: {op} multiplied values that are not bf16 ({dtypes})"


def test_kernel_state_sums_3137_tokens_in_fp32():
    """The key/value state and the normaliser of bf16 features are fp32 sums: their error is fp32's, not
    bf16's (a bf16 normaliser near 3137 would be off by up to 8: its spacing there is 16)."""
    torch.manual_seed(0)
    phi_k = (torch.rand(2, 3, 3137, 16) + 0.5).bfloat16()
    v = torch.randn(2, 3, 3137, 8).bfloat16()
    phi_q = torch.rand(2, 3, 5, 16).bfloat16()
    with bf16_devices("cpu"):
        ((kv, z),) = linear_state(phi_k, v)
        out = linear_readout(phi_q, ((kv, z),))
    assert kv.dtype == z.dtype == out.dtype == torch.float32
    kv64, z64 = (
        phi_k.double().transpose(-2, -1) @ v.double(),
        phi_k.double().sum(-2, keepdim=True).transpose(-2, -1),
    )
    assert (z.double() - z64).abs().max() <= 1e-6 * z64.max()  # fp32-accurate (bf16: ~4e-3)
    assert (kv.double() - kv64).abs().max() <= 1e-6 * (
        phi_k.double().transpose(-2, -1) @ v.double().abs()
    ).max()


# ----------------------------------------------------------------------------- the GPU kernel and its backward


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((2, 3, 7, 5), (2, 3, 5, 4)), ((2, 3, 7, 5), (3, 5, 4)), ((2, 3, 7, 5), (5, 4)), ((7, 5), (5, 4))],
)
def test_fp32_out_matmul_has_its_twins_shape_on_meta_tensors(a_shape, b_shape):
    """The CUDA path calls ``bmm(out_dtype=float32)``, which torch 2.14 runs on meta tensors too (not on the
    CPU): same shape as the fp32 product, fp32 result, broadcasting as matmul does."""
    a = torch.empty(a_shape, dtype=torch.bfloat16, device="meta")
    b = torch.empty(b_shape, dtype=torch.bfloat16, device="meta")
    out = bmm_fp32_out(a, b)
    assert out.dtype == torch.float32
    assert out.shape == (torch.empty(a_shape) @ torch.empty(b_shape)).shape


def test_fp32_out_matmul_backward_is_the_gradient_of_the_product():
    """The hand-written backward (``bmm.dtype`` has no derivative) against autograd of the float64 product on
    the same bf16 values: gradients within bf16 rounding of the incoming gradient (it is rounded once)."""
    torch.manual_seed(0)
    a = torch.randn(2, 3, 40, 16).bfloat16().requires_grad_()
    b = torch.randn(3, 16, 8).bfloat16().requires_grad_()  # broadcast over the batch dim, as Hedgehog's W
    grad = torch.randn(2, 3, 40, 8)
    out = bmm_fp32_out(a, b)
    assert out.dtype == torch.float32
    out.backward(grad)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (a64 @ b64).backward(grad.double())
    torch.testing.assert_close(out.double(), a64 @ b64, rtol=1e-6, atol=1e-6)
    for got, want in ((a.grad, a64.grad), (b.grad, b64.grad)):
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).abs().max() <= 4 * U * want.abs().max()


def test_matmul_fp32_keeps_fp32_products_unchanged():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 5, 2)
    assert torch.equal(matmul_fp32(a, b), a @ b)
    assert matmul_fp32(a.double(), b).dtype == torch.float64


def test_split_bf16_carries_sixteen_significant_bits():
    w = torch.randn(64, 256)
    hi, lo = split_bf16(w)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert (hi.float() + lo.float() - w).abs().max() <= 2.0**-16 * w.abs().max()
    assert (hi.float() - w).abs().max() > 2.0**-12 * w.abs().max()  # hi alone is only bf16


def test_split_products_keep_the_fp32_factor_to_sixteen_bits_on_either_side():
    """x @ w (bf16 x, fp32 w: `matmul_split`) and w @ x (`matmul_split_left`) within 2^-15 of the float64
    product of the same values (relative to sum |x||w|), where rounding w to bf16 is off by more than 2^-10;
    fp32 operands give the plain product."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 16).bfloat16()
    w = torch.randn(3, 16, 24)
    scale = (x.double().abs() @ w.double().abs()).max()
    right, left = matmul_split(x, w), matmul_split_left(w.transpose(-2, -1), x.transpose(-2, -1))
    exact = x.double() @ w.double()
    assert right.dtype == left.dtype == torch.float32
    for got in (right, left.transpose(-2, -1)):
        assert (got.double() - exact).abs().max() <= 2.0**-15 * scale
    assert (x.double() @ w.bfloat16().double() - exact).abs().max() > 2.0**-10 * scale
    xf = x.float()
    assert torch.equal(
        matmul_split_left(w.transpose(-2, -1), xf.transpose(-2, -1)),
        w.transpose(-2, -1) @ xf.transpose(-2, -1),
    )


def test_training_step_in_bf16_gives_the_fp32_gradients():
    """A layer's forward + backward under bf16 autocast with the bf16 core: gradients point where fp32's do."""
    for name in ("relu_linear", "performer", "linformer", "hedgehog", "agent", "window_linear"):
        module = build(name, (4, 5)).train()
        x = torch.randn(2, 21, 64)
        module(x).square().mean().backward()
        fp32 = [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        with bf16_devices("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
            module(x).float().square().mean().backward()
        for g32, p in zip(fp32, module.parameters(), strict=True):
            assert torch.isfinite(p.grad).all()
            cosine = F.cosine_similarity(p.grad.flatten().double(), g32.flatten().double(), dim=0)
            assert cosine > 0.99, f"{name}: gradient cosine {cosine:.4f}"


# ----------------------------------------------------------------------------- agent and window_linear: the fp32 parts

#: aten ops that only move, select or cast values: exact in any dtype.
LAYOUT_OPS = (
    "aten._to_copy",
    "aten._unsafe_view",
    "aten.cat",
    "aten.clone",
    "aten.constant_pad_nd",
    "aten.expand",
    "aten.permute",
    "aten.select",
    "aten.slice",
    "aten.transpose",
    "aten.unsqueeze",
    "aten.view",
)


class DtypeLog(TorchDispatchMode):
    """Records (op, output dtype) of every aten call that returns a floating tensor."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        floats = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if floats:
            self.calls.append((str(func.overloadpacket), floats[0].dtype))
        return out


@pytest.mark.parametrize(
    "name, bf16_arithmetic",
    [
        ("agent", set()),
        # the prefix rows are SDPA (its own fp32 statistics, as `window`); the 0/1 key mask on bf16 features
        ("window_linear", {"aten._scaled_dot_product_flash_attention_for_cpu", "aten.mul"}),
    ],
)
def test_agent_and_window_linear_compute_their_fp32_parts_in_fp32(name, bf16_arithmetic):
    """What the policies declare fp32 (pooling, resized biases, logits, max, exp, softmax, the window states,
    their totals and "total minus own", the shared normaliser, gamma, the division) is computed by aten calls
    that return fp32: the only arithmetic with a bf16 result is what the policy names bf16 (and exact masks).
    bf16 does reach them: the core's operands are bf16."""
    module = build(name, (4, 5))
    q, k, v = bf16_qkv(module, 21, 2.0)
    with torch.no_grad(), bf16_devices("cpu"), DtypeLog() as log:
        module.attend(q, k, v)
    arithmetic = [(op, dtype) for op, dtype in log.calls if not op.startswith(LAYOUT_OPS)]
    in_bf16 = {op for op, dtype in arithmetic if dtype == torch.bfloat16}
    assert in_bf16 <= bf16_arithmetic, f"{name}: {sorted(in_bf16 - bf16_arithmetic)} ran in bf16"
    ops = {op for op, _ in arithmetic}
    assert {"aten._softmax", "aten.bmm"} <= ops and (name == "agent") == ("aten._adaptive_avg_pool2d" in ops)
    assert ("aten._to_copy", torch.bfloat16) in log.calls  # operands rounded: the bf16 path ran


def test_agent_logits_keep_fp32_accuracy_so_the_agents_are_split():
    """The agents are means of q, not bf16 numbers. Rounded to bf16 they would move the logits (up to ~80
    here) by L 2^-9 and the maps' probabilities by ~u; as two bf16 halves (`matmul_split`) against bf16 q and
    k, both maps match float64 maps of the same inputs to ~1e-5 (fp32's accuracy after the softmax)."""
    module = build("agent", (4, 5))
    q, k, _ = bf16_qkv(module, 21, 8.0, batch=1)
    double = copy.deepcopy(module).double()
    with torch.no_grad():
        exact = double._map_context(q.double(), k.double())
        with bf16_devices("cpu"):
            ours = module._map_context(q, k)
        agents = module.agents(q.float()) * module.scale
        rounded = agents.bfloat16().float()
        bias = module._position_bias(module.query_agent_bias, 21).transpose(-2, -1)
        naive = (q.float() @ rounded.transpose(-2, -1) + bias).softmax(-1)
    assert (q.double() @ agents.double().transpose(-2, -1)).abs().max() > 50  # peaked: large logits
    for got, want in zip(ours, exact, strict=True):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 1e-4
    assert (naive.double() - exact[0]).abs().max() > U


def test_window_linear_shared_normaliser_is_fp32_accurate():
    """The shared normaliser of a grid row: sum_j exp(s q.k_j - c) over the window and prefix keys, plus gamma
    phi(q).z_outside, z_outside the total of all windows' feature sums minus the row's own window.

    With gamma = 0 it is the window softmax's row sum: exp of fp32 logits (bf16 q, k products summed in
    fp32, scaled in fp32) summed in fp32 is within 1e-5 (relative) of float64 on the same inputs, where scaling q by
    s = d^-1/2 in bf16 (peaked rows, logits up to ~100) moves it by more than 5 u. With gamma > 0 the
    features and z_outside are each rounded once: within 3 u (relative, all terms non-negative), at 3137
    tokens too. (A bf16 accumulation of the window states fails the oracle test above at 6.6 u S.)"""
    for grid, qk_scale in (((4, 5), 8.0), ((56, 56), 6.0)):
        module = build("window_linear", grid)
        q, k, v = bf16_qkv(module, 1 + grid[0] * grid[1], qk_scale, batch=1)
        p, _, qw, kw, vw, valid = module._windows(q, k, v)
        for gamma in (None, 0.0):
            if gamma is not None:
                with torch.no_grad():
                    module.linear_log_weight.fill_(float("-inf"))
            double = copy.deepcopy(module).double()
            with torch.no_grad():
                _, want = double.shared_sums(qw.double(), kw.double(), vw.double(), valid, p)
                with bf16_devices("cpu"):
                    numerator, got = module.shared_sums(qw, kw, vw, valid, p)
            assert got.dtype == numerator.dtype == torch.float32
            relative = ((got.double() - want) / want).abs().max().item()
            assert relative <= (1e-5 if gamma == 0.0 else 3 * U), (
                f"{grid}, gamma {gamma}: {relative / U:.3g} u"
            )
        logits = ((qw.float() * module.scale).bfloat16().float() @ kw.float().transpose(-2, -1)).double()
        logits = logits.masked_fill(~valid, float("-inf")) if valid is not None else logits
        naive = (logits - logits.amax(-1, keepdim=True)).exp().sum(-1, keepdim=True)
        assert ((naive - want) / want).abs().max() > 5 * U


# ----------------------------------------------------------------------------- what is not safe, and why


@pytest.mark.parametrize("name", FP32_ONLY)
def test_fp32_attentions_ignore_bf16_devices(name):
    """Declared fp32: with bf16 enabled on the CPU the core computes exactly what the fp32 core computes."""
    module = build(name, (4, 5))
    q, k, v = bf16_qkv(module, 21, 2.0)
    with torch.no_grad():
        plain = module.attend(q, k, v)
        with bf16_devices("cpu"), MatmulLog() as log:
            enabled = module.attend(q, k, v)
    assert torch.equal(plain, enabled)
    assert all(dtypes.count(torch.bfloat16) == 0 for _, dtypes, _, _ in log.calls)


def test_elu_features_keep_the_tail_in_bf16():
    """elu(x) + 1 = e^x for x < 0, but bf16 first rounds elu(x) to about -1 (spacing 2^-8 there), so the
    textbook form gives e^-6 = 0.0025 as 0 or 0.0039. `ELUFeatures` computes e^min(x, 0) + max(x, 0): one
    rounding, within u even in bf16; the attention evaluates it in fp32 (the d^-1/4 scaling included) and
    rounds once, so its features are within u of the exact ones."""
    module = build("elu_linear", (4, 5))
    scale = module.head_dim**-0.25
    q = (torch.tensor([-6.0, -4.0, -2.0, 0.5]) / scale).bfloat16()  # the core's bf16 input
    exact = F.elu(q.double() * scale) + 1 + 1e-6
    scaled = (q * scale).bfloat16()  # the map's own error, on the input it is given:
    exact_here = F.elu(scaled.double()) + 1 + 1e-6
    textbook = F.elu(scaled) + 1 + 1e-6
    assert ((textbook.double() - exact_here).abs() / exact_here).max() > 0.25
    assert ((ELUFeatures()(scaled).double() - exact_here).abs() / exact_here).max() <= U
    with bf16_devices("cpu"):
        ours = module.query_features(q)
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - exact).abs() / exact).max() <= U


def test_performer_projection_in_bf16_moves_the_exponent_so_it_is_split():
    """At large |k| the exponent reaches ~50; one bf16 rounding of the projection moves it by ~0.1 (7 % in
    2^x), the two-term split by ~1e-5. Features, after exp2 in fp32, are rounded once (<= u, plus the
    split's 1e-5 in the exponent)."""
    module = build("performer", (56, 56))
    _, k, _ = bf16_qkv(module, 3137, 4.0, batch=1)
    exact = k.double() @ module._projection(torch.float64)
    naive = k.float() @ module._projection(torch.float32).bfloat16().float()
    with bf16_devices("cpu"):
        split = module._exponent(k)
    assert exact.abs().max() > 30
    assert (naive.double() - exact).abs().max() > 0.05
    assert (split.double() - exact).abs().max() < 1e-3
    reference = module.double().key_features(k.double())
    module.float()
    with bf16_devices("cpu"):
        features = module.key_features(k)
    assert features.dtype == torch.bfloat16
    assert ((features.double() - reference).abs() / reference).max() <= U + 1e-4


def test_cosformer_angles_stay_fp32_at_positions_bf16_cannot_count():
    """Positions above 256 are not bf16 numbers: bf16 angles would give tokens 3000..3007 one weight."""
    n = 3137
    assert torch.arange(n, dtype=torch.bfloat16)[3000:3008].unique().numel() == 1
    module = build("cosformer", (56, 56))
    x = torch.ones(1, 1, n, 4, dtype=torch.bfloat16)
    with bf16_devices("cpu"):
        cos_block, _ = module.query_features(x)
    theta = (math.pi / 2) * torch.arange(n, dtype=torch.float64) / n
    exact_cos = (1 + 1e-6) * theta.cos()
    assert ((cos_block[0, 0, :, 0].double() - exact_cos).abs() <= U * exact_cos + 1e-30).all()
    assert cos_block[0, 0, 3000:3008, 0].unique().numel() > 1


def test_nystrom_pseudo_inverse_in_bf16_is_far_off_so_nystrom_stays_fp32():
    """The landmark kernel of a peaked layer is ill-conditioned (cond ~ 1e4): rounding it to bf16 moves its
    pseudo-inverse by several per cent, ten times bf16's rounding."""
    module = build("nystrom", (56, 56), dim=128)
    q, k, _ = bf16_qkv(module, 3137, 3.0, batch=1)
    q, k = q.double(), k.double()
    ql, kl = module.landmarks(q * module.scale), module.landmarks(k)
    a = (ql @ kl.transpose(-2, -1)).softmax(-1)
    exact = iterative_pinv(a)
    rounded = iterative_pinv(a.bfloat16().double())
    assert (rounded - exact).abs().max() > 10 * U * exact.abs().max()
    assert not precision_policies()["nystrom"].uses_bf16
