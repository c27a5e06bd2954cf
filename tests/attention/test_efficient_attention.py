"""The efficient-attention zoo against first principles.

Every registered attention: its implicit map times v equals its core (float64), row-stochastic
maps are row-stochastic, chunked maps equal unchunked ones, forward passes never create an
N x N tensor (checked on every aten op's output at N = 3137), reduced precision at large
magnitudes stays finite. Family-specific checks compare with hand-written formulas or with
limits where a family must reduce to softmax / window attention exactly.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import (
    ZOO_GRID as GRID,
    ZOO_OPTIONS as SMALL_OPTIONS,
    ZOO_PREFIX as PREFIX,
    ZOO_TOKENS as N_SMALL,
    tiny_vit,
)
from timm.layers import Attention
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnxfer.errors import InputError, did_you_mean
from attnxfer.models import efficient, make_transfer_aware
from attnxfer.models.efficient import (
    COUNTERPART_MODULES,
    EfficientAttention,
    attention_layer,
    build_efficient_student,
    configure_token_layout,
    create_attention,
    efficient_student_from_teacher,
    get_attention_class,
    list_attentions,
    new_parameters,
    register_attention,
    swap_attentions,
)
from attnxfer.models.efficient.base import rope_support
from attnxfer.models.efficient.swap import with_attention
from attnxfer.transfer import TeacherStudent

ALL = list_attentions()


def build(
    name: str, dim: int = 32, num_heads: int = 2, prefix: int = PREFIX, grid=GRID, **extra
) -> EfficientAttention:
    options = dict(SMALL_OPTIONS.get(name, {}))
    if name == "linformer":
        options["seq_len"] = prefix + grid[0] * grid[1]
    options.update(extra)
    return create_attention(
        name, dim=dim, num_heads=num_heads, qkv_bias=True, num_prefix_tokens=prefix, grid_size=grid, **options
    )


def randomise_new_parameters(module: EfficientAttention, seed: int = 0) -> None:
    """Zero/identity inits would make some checks trivial: move every new parameter off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in module.new_parameter_names():
            p = module.get_parameter(name)
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def project_qkv(module, x):
    qkv = module.project(x)
    return qkv["q"], qkv["k"], qkv["v"]


def qkv64(module: EfficientAttention, n: int = N_SMALL, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(batch, n, module.qkv.in_features, dtype=torch.float64)
    return project_qkv(module, x)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tests/conftest.py


ATTENDING = [
    n for n in ALL if n != "none"
]  # `none` has no attention branch (zeros out): tests/families/test_convert_hier.py covers it


@pytest.fixture(params=ATTENDING)
def name(request):
    return request.param


# ----------------------------------------------------------------------------- registry


def test_list_attentions_filters_by_the_declared_map_kind():
    """The registry is the list (no copy of it here): each attention declares its kind, the filter reads it,
    and softmax refines row_stochastic. What each kind promises is checked per attention below: rows that
    sum to one (`test_row_stochastic_maps_sum_to_one_without_negatives`), signs (`test_signed_maps_go_negative`),
    no map (`test_map_times_v_equals_attend`)."""
    kinds = {n: get_attention_class(n).map_kind for n in ALL}
    assert sorted(kinds) == ALL and kinds["softmax"] == "softmax"
    for kind in ("softmax", "row_stochastic", "signed", "none"):
        assert list_attentions(kind) == [n for n in ALL if kinds[n].refines(kind)]
    assert "softmax" in list_attentions("row_stochastic")
    assert get_attention_class("formula").map_kind == "row_stochastic"  # the plain name: Hedgehog's program


def test_every_built_in_attention_declares_its_rope_answer():
    """The base's "undeclared" rope answer passes every other test, and copies into the docs' rope table as it
    is: each built-in attention sets its own, on its class or a base below EfficientAttention."""
    built_in = [n for n in rope_support() if get_attention_class(n).__module__.startswith("attnxfer.")]
    undeclared = [n for n in built_in if rope_support()[n][1] == EfficientAttention.rope_why]
    assert not undeclared, (
        f"{undeclared} declare no rope answer: set rope_keeps_map_kind (whether a teacher's rotary embedding "
        "keeps the map kind) and rope_why (why, one line from the math) on the class"
    )


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="known attentions: agent, cosformer") as e:
        create_attention("flash_linear", dim=8)
    # a user's error, printed as written: a plain KeyError's str is its message in quotes
    assert isinstance(e.value, InputError) and str(e.value).startswith("unknown attention 'flash_linear'")


def test_create_attention_takes_dim_positionally_as_the_class_does():
    module = create_attention("performer", 48, 4)
    assert (module.proj.in_features, module.num_heads) == (48, 4)


def test_register_rejects_a_second_class_under_a_taken_name():
    """A copied file that kept the name: both classes may share a class name too, so their modules are said."""
    other = type("PerformerAttention", (EfficientAttention,), {"__module__": "my_fork.performer_copy"})
    with pytest.raises(ValueError, match="already registered") as e:
        register_attention("performer")(other)
    said = str(e.value)
    assert "attnxfer.models.efficient.performer.PerformerAttention" in said
    assert "my_fork.performer_copy.PerformerAttention a name of its own" in said


@pytest.mark.parametrize("name", ["cos-lin", "Cosine", "2x_linear", "", "top k"])
def test_attention_names_are_words_as_configs_and_tables_name_them(name):
    with pytest.raises(ValueError, match="lower-case words"):
        register_attention(name)


def test_an_attention_without_attend_says_what_to_define():
    bare = type("Bare", (EfficientAttention,), {})(dim=8, num_heads=2)
    q = k = v = torch.zeros(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match=r"Bare defines no _attend\(q, k, v\)"):
        bare.attend(q, k, v)


def test_a_short_name_of_one_attention_is_answered_with_it():
    """'topk' for topk_sparse: too short for difflib to find it near the whole name, a part of it alone."""
    assert did_you_mean("topk", ["relu_linear", "topk_sparse", "window"]) == "; did you mean 'topk_sparse'?"


def test_two_zoo_classes_of_one_name_are_refused_not_one_imported_for_the_other():
    """A new file copied from another with its class name kept: `from attnxfer.models.efficient import <Class>`
    would give whichever registered last, the copy for the original too."""
    first, second = (
        type("LinearAttention", (EfficientAttention,), {"__module__": f"attnxfer.models.efficient.{m}"})
        for m in ("linear", "my_linear")
    )
    first.attention_name, second.attention_name = "relu_linear", "my_linear"
    with pytest.raises(
        TypeError, match="two zoo attentions have the class name LinearAttention: 'relu_linear'"
    ):
        efficient._by_class_name([first, second])
    # one file's classes made in a loop under one name (each registered under its own) still import
    second.__module__ = first.__module__
    assert efficient._by_class_name([first, second]) == {"LinearAttention": second}


def test_unknown_option_names_the_attentions_own_options():
    with pytest.raises(TypeError, match="window_size"):
        create_attention("window", dim=8, num_heads=2, windw_size=3)


def test_parameter_names_match_timm_attention():
    teacher = Attention(32, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    for n in ALL:
        module = build(n, qk_norm=True, norm_layer=torch.nn.LayerNorm)
        counterpart = {k for k in module.state_dict() if k.split(".")[0] in COUNTERPART_MODULES}
        assert counterpart == set(teacher.state_dict()), n
        missing, unexpected = module.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected
        assert {m.split(".")[0] for m in missing} <= {
            m.split(".")[0] for m in module.new_parameter_names()
        } | {"feature_projection"}, n


def test_softmax_is_timm_attention():
    torch.manual_seed(0)
    teacher = Attention(32, num_heads=2, qkv_bias=True).eval()
    student = create_attention("softmax", dim=32, num_heads=2, qkv_bias=True).eval()
    student.load_state_dict(teacher.state_dict(), strict=True)
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(student(x), teacher(x))


# ----------------------------------------------------------------------------- maps, all families


def test_map_times_v_equals_attend(name):
    module = build(name).double()
    randomise_new_parameters(module)
    q, k, v = qkv64(module)
    attn_map = module.attention_map(q, k)
    if module.map_kind == "none":
        assert attn_map is None
        with pytest.raises(TypeError, match="no attention map"):
            module.attend_mapped(q, k, v)
        return
    assert attn_map.shape == (2, 2, N_SMALL, N_SMALL)
    torch.testing.assert_close(attn_map @ v, module.attend_mapped(q, k, v), rtol=1e-9, atol=1e-10)
    if name != "focused_linear":  # the only family with a term outside the map
        torch.testing.assert_close(module.attend_mapped(q, k, v), module.attend(q, k, v), rtol=0, atol=0)


def test_forward_is_projection_of_attend(name):
    module = build(name).double().eval()
    randomise_new_parameters(module)
    x = torch.randn(2, N_SMALL, 32, dtype=torch.float64)
    q, k, v = project_qkv(module, x)
    core = module.attend(q, k, v).transpose(1, 2).reshape(2, N_SMALL, 32)
    torch.testing.assert_close(module(x), module.proj(core), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list_attentions("row_stochastic"))
def test_row_stochastic_maps_sum_to_one_without_negatives(name):
    module = build(name).double()
    randomise_new_parameters(module)
    q, k, _ = qkv64(module)
    attn_map = module.attention_map(3 * q, 3 * k)
    torch.testing.assert_close(attn_map.sum(-1), torch.ones_like(attn_map[..., 0]), rtol=0, atol=1e-12)
    assert attn_map.min() >= 0


@pytest.mark.parametrize("name", list_attentions("signed"))
def test_signed_maps_go_negative(name):
    """A signed map is not a distribution: on peaked q, k its rows take negative entries somewhere (else the
    attention would be row-stochastic and take the cross-entropy)."""
    module = build(name).double()
    randomise_new_parameters(module)
    q, k, _ = qkv64(module)
    attn_map = module.attention_map(3 * q, 3 * k)
    assert attn_map.min() < 0


def test_map_chunks_equal_the_whole_map(name):
    module = build(name).double()
    if module.map_kind == "none":
        assert module.attention_map(*qkv64(module)[:2]) is None
        return
    randomise_new_parameters(module)
    q, k, _ = qkv64(module)
    module.map_chunk_size = 10_000
    whole = module.attention_map(q, k)
    module.map_chunk_size = 3
    torch.testing.assert_close(module.attention_map(q, k), whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        module.attention_map(q, k, rows=slice(4, 13)), whole[:, :, 4:13], rtol=0, atol=1e-13
    )


NEW_PARAMETERS = {
    "agent": {"agent_key_bias", "query_agent_bias"},
    "focused_linear": {"focus_scale", "dwc.weight", "dwc.bias"},
    "hedgehog": {"feature_map_q.weight", "feature_map_q.bias", "feature_map_k.weight", "feature_map_k.bias"},
    "window_linear": {
        "linear_log_weight",
        "feature_map_q.weight",
        "feature_map_q.bias",
        "feature_map_k.weight",
        "feature_map_k.bias",
    },
    "linformer": {"seq_proj_k", "seq_proj_v"},
    "hydra": {"channel_gain"},
    "hashing": {"hash_q", "hash_k"},
    "formula": {  # Hedgehog's program: proj before cat, separate q and k maps
        "features_q.steps.0.weight",
        "features_q.steps.0.bias",
        "features_k.steps.0.weight",
        "features_k.steps.0.bias",
    },
}


def test_new_parameter_names(name):
    # Parameter-free families (relu/elu linear, performer, cosformer, window, nystrom, softmax)
    # start from the teacher's q/k alone; performer's projection is a buffer, not a parameter.
    assert set(build(name).new_parameter_names()) == NEW_PARAMETERS.get(name, set())


@pytest.mark.parametrize("name", sorted(NEW_PARAMETERS))
def test_new_parameters_receive_gradients(name):
    module = build(name)
    x = torch.randn(2, N_SMALL, 32)
    module(x).square().mean().backward()
    for n in module.new_parameter_names():
        grad = module.get_parameter(n).grad
        assert grad is not None and grad.abs().sum() > 0, n


def test_attend_gradients_match_finite_differences(name):
    """Autograd through every core (in-place shortcuts, stabilisers, windows) against finite differences."""
    tiny = dict(
        window_size=2,
        agent_grid=(1, 2),
        bias_grid=2,
        num_landmarks=3,
        proj_len=3,
        num_features=8,
        kernel_size=3,
    )
    cls = get_attention_class(name)
    module = build(
        name,
        dim=4,
        num_heads=1,
        prefix=1,
        grid=(2, 3),
        **{k: v for k, v in tiny.items() if cls.accepts_option(k)},
    ).double()
    randomise_new_parameters(module)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 1, 7, 4, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    assert torch.autograd.gradcheck(module.attend, (q, k, v), atol=1e-5, rtol=1e-3)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.numel, self.where = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.where = t.numel(), (str(func), tuple(t.shape))
        return out


def test_forward_never_builds_an_n_by_n_tensor(name):
    grid, prefix = (56, 56), 1
    n = prefix + grid[0] * grid[1]  # 3137 tokens: 224px at patch 4
    full_size = {
        "window": dict(window_size=7),
        "window_linear": dict(window_size=7),
        "agent": dict(agent_grid=7, bias_grid=7),
        "nystrom": dict(num_landmarks=32),
    }
    module = build(name, dim=16, num_heads=1, prefix=prefix, grid=grid, **full_size.get(name, {})).eval()
    x = torch.randn(1, n, 16)
    with torch.no_grad(), LargestTensor() as largest:
        out = module(x)
    assert out.shape == (1, n, 16) and torch.isfinite(out).all()
    assert largest.numel < n * n // 20, f"{name}: {largest.where} is O(N^2)"


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_large_magnitudes_stay_finite(name, dtype):
    module = build(name).to(dtype).eval()
    torch.manual_seed(0)
    x = 100 * torch.randn(2, N_SMALL, 32, dtype=dtype)
    with torch.no_grad():
        out = module(x)
        q, k, v = project_qkv(module, x)
        core = module.attend(30 * q, 30 * k, v)
    assert out.dtype == dtype and core.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(core).all()


@pytest.mark.parametrize(
    "name", [n for n in ALL if n != "softmax"]
)  # softmax: SDPA in the input dtype, as timm
def test_core_runs_in_fp32_under_autocast(name):
    module = build(name).eval()
    q, k, v = (t.float() for t in qkv64(build(name).double()))
    with torch.no_grad():
        plain = module.attend(q, k, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = module.attend(q, k, v)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


# ----------------------------------------------------------------------------- family-specific references


def softmax_map(q, k):
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)


def normalised(scores):
    return scores / scores.sum(-1, keepdim=True)


def test_relu_and_elu_maps_match_their_kernels():
    for name, phi, s in (
        ("relu_linear", lambda x: F.relu(x) + 1e-6, 1.0),
        ("elu_linear", lambda x: F.elu(x) + 1 + 1e-6, 16**-0.25),
    ):
        module = build(name).double()
        q, k, _ = qkv64(module)
        torch.testing.assert_close(
            module.attention_map(q, k), normalised(phi(q * s) @ phi(k * s).transpose(-2, -1))
        )


def test_cosformer_reweights_by_cosine_of_position_distance():
    module = build("cosformer").double()
    q, k, _ = qkv64(module)
    n = q.shape[-2]
    i = torch.arange(n, dtype=torch.float64)
    cos = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / n)
    kernel = (F.relu(q) + 1e-6) @ (F.relu(k) + 1e-6).transpose(-2, -1)
    torch.testing.assert_close(module.attention_map(q, k), normalised(kernel * cos))


def test_focused_linear_focusing_function_and_local_term():
    module = build("focused_linear").double()
    randomise_new_parameters(module)
    q, k, v = qkv64(module)
    scale = F.softplus(module.focus_scale)

    def focus(x):
        x = (F.relu(x) + 1e-6) / scale
        powered = x**3
        return powered / powered.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True)

    torch.testing.assert_close(module.attention_map(q, k), normalised(focus(q) @ focus(k).transpose(-2, -1)))
    # The depthwise conv on v by explicit shifts over the zero-padded grid; prefix tokens get nothing.
    B, H, _N, d = v.shape
    grid_v = F.pad(v[:, :, PREFIX:].reshape(B, H, *GRID, d), (0, 0, 1, 1, 1, 1))
    weight, bias = module.dwc.weight[:, 0], module.dwc.bias  # (d, 3, 3), (d,)
    local = bias.expand(B, H, *GRID, d).clone()
    for dy in range(3):
        for dx in range(3):
            local += grid_v[:, :, dy : dy + GRID[0], dx : dx + GRID[1]] * weight[:, dy, dx]
    expected = torch.cat([torch.zeros(B, H, PREFIX, d, dtype=v.dtype), local.reshape(B, H, -1, d)], dim=-2)
    torch.testing.assert_close(module.attend(q, k, v) - module.attend_mapped(q, k, v), expected)


def test_focused_linear_starts_without_the_local_term():
    module = build("focused_linear").double()
    q, k, v = qkv64(module)
    torch.testing.assert_close(module.attend(q, k, v), module.attend_mapped(q, k, v), rtol=0, atol=0)


def window_allowed(prefix, grid, window):
    """Explicit (N, N) mask by coordinates: same window, or a prefix token on either side."""
    coords = [None] * prefix + [
        (r // window[0], c // window[1]) for r in range(grid[0]) for c in range(grid[1])
    ]
    n = len(coords)
    return torch.tensor(
        [
            [coords[i] is None or coords[j] is None or coords[i] == coords[j] for j in range(n)]
            for i in range(n)
        ]
    )


def test_window_attention_is_softmax_restricted_to_window_and_prefix():
    module = build("window").double()
    q, k, _ = qkv64(module)
    allowed = window_allowed(PREFIX, GRID, (2, 2))
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    expected = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(module.attention_map(q, k), expected)
    # prefix tokens attend to everything and everything attends to them
    assert (expected[..., 0, :] > 0).all() and (expected[..., :, 0] > 0).all()


def test_window_covering_the_grid_is_softmax():
    module = build("window", window_size=GRID).double()
    q, k, v = qkv64(module)
    torch.testing.assert_close(module.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("name", ["window", "window_linear"])
def test_a_window_wider_than_the_grid_is_one_window_of_the_grid_not_a_padded_one(name):
    # as Swin clamps its window to the resolution: the same attention, without the padded tokens' work
    wide, fitted = build(name, window_size=(9, GRID[1] + 1)).double(), build(name, window_size=GRID).double()
    fitted.load_state_dict(wide.state_dict())
    q, k, v = qkv64(wide)
    torch.testing.assert_close(wide.attend(q, k, v), fitted.attend(q, k, v))
    torch.testing.assert_close(wide.attention_map(q, k), fitted.attention_map(q, k))
    assert wide.operation_counts(N_SMALL) == fitted.operation_counts(N_SMALL)


@pytest.mark.parametrize(
    "name, option",
    [
        ("window", dict(window_size=0)),
        ("window", dict(window_size=(2, 0))),
        ("agent", dict(agent_grid=0)),
        ("agent", dict(bias_grid=0)),
        ("performer", dict(num_features=0)),
        ("hedgehog", dict(feature_dim=0)),
        ("window_linear", dict(feature_dim=0)),
    ],
)
def test_a_size_option_below_one_is_refused_where_the_attention_is_built(name, option):
    # not a default in its place (0 is falsy) nor a division by zero at the first forward
    with pytest.raises(ValueError, match=f"{next(iter(option))} must be"):
        build(name, **option)


@pytest.mark.parametrize(
    "name, option, message",
    [
        ("focused_linear", dict(kernel_size=-1), "kernel_size must be odd and >= 1"),
        ("window", dict(window_size=2.5), "window_size must be an int or (height, width)"),
        ("focused_linear", dict(focusing_factor=0), "focusing_factor must be > 0"),
        ("nystrom", dict(pinv_iterations=-1), "pinv_iterations must be >= 0"),
    ],
)
def test_an_option_the_attention_cannot_take_is_refused_in_one_line(name, option, message):
    # not a torch error at the conv's construction, nor "'float' object is not iterable"
    with pytest.raises(InputError, match=re.escape(message)):
        build(name, **option)


def test_window_linear_hybrid_shares_one_normaliser():
    module = build("window_linear").double()
    randomise_new_parameters(module)
    q, k, _ = qkv64(module)
    allowed = window_allowed(PREFIX, GRID, (2, 2))
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    local = logits.masked_fill(~allowed, float("-inf"))
    local = (local - local.amax(-1, keepdim=True)).exp()
    phi_q, phi_k = module.features(q, k)
    gamma = module.linear_log_weight.exp()[None, :, None, None]
    expected = normalised(torch.where(allowed, local, gamma * (phi_q @ phi_k.transpose(-2, -1))))
    torch.testing.assert_close(module.attention_map(q, k), expected)


def test_window_linear_without_linear_weight_is_window_attention():
    hybrid, window = build("window_linear").double(), build("window").double()
    with torch.no_grad():
        hybrid.linear_log_weight.fill_(-1e4)
    q, k, v = qkv64(hybrid)
    torch.testing.assert_close(hybrid.attend(q, k, v), window.attend(q, k, v))


def test_agent_map_is_product_of_two_softmaxes_through_pooled_agents():
    module = build("agent", agent_grid=(2, 5)).double()  # grid 4x5 -> agents average 2x1 blocks
    q, k, _ = qkv64(module)
    B, H, _N, d = q.shape
    grid_q = q[:, :, PREFIX:].reshape(B, H, 4, 5, d)
    agents = 0.5 * (grid_q[:, :, 0::2] + grid_q[:, :, 1::2]).reshape(B, H, 10, d)
    s = d**-0.5
    expected = (q @ agents.transpose(-2, -1) * s).softmax(-1) @ (agents @ k.transpose(-2, -1) * s).softmax(-1)
    torch.testing.assert_close(module.attention_map(q, k), expected)


def test_nystrom_with_every_token_a_landmark_is_softmax():
    module = build("nystrom", num_landmarks=N_SMALL, pinv_iterations=30).double()
    q, k, v = qkv64(module)
    torch.testing.assert_close(module.attention_map(q, k), softmax_map(q, k), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        module.attend(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-6, atol=1e-8
    )


def test_linformer_with_identity_projections_is_softmax_and_checks_length():
    module = build("linformer", proj_len=N_SMALL).double()
    with torch.no_grad():
        module.seq_proj_k.copy_(torch.eye(N_SMALL))
        module.seq_proj_v.copy_(torch.eye(N_SMALL))
    q, k, v = qkv64(module)
    torch.testing.assert_close(module.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))
    # a run at another size than the options' seq_len (recall/convert_zoo with data.img_size changed) is told the key
    with pytest.raises(
        ValueError, match=r"rebuild it with seq_len=9 \(.*convert\.attention_kwargs.*\{seq_len: 9\}\)"
    ):
        module(torch.randn(1, 9, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs seq_len"):
        create_attention("linformer", dim=32, num_heads=2)


def test_linformer_on_a_teacher_of_any_size_says_to_give_seq_len_not_that_it_cannot_convert():
    # a dynamic_img_size teacher (the recall teacher) has no one token count to fill in, but converts with
    # seq_len given (recall/convert_zoo does): the refusal said "linformer cannot convert it"
    teacher = tiny_vit(depth=2, img_size=32, patch_size=8, dynamic_img_size=True)
    with pytest.raises(InputError, match=r"dynamic_img_size.*convert\.attention_kwargs.*\{seq_len: N\}") as e:
        build_efficient_student(teacher, "linformer")
    assert "dynamic_img_size) has no one token count, so linformer cannot convert it" not in str(e.value)
    student = build_efficient_student(teacher, "linformer", seq_len=17, proj_len=8)  # 64 would exceed 17
    assert student(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_a_dynamic_size_teachers_window_wider_than_its_grid_is_refused_where_it_is_converted():
    """A dynamic-size teacher (the recall task's) declares no grid, but trains at the size it was built for: a
    window over all of that grid would fit exact softmax there (stage 1, the choice's scores), which says
    nothing of the window at the resolutions where it is local."""
    teacher = tiny_vit(depth=2, img_size=32, patch_size=8, dynamic_img_size=True)  # a 4x4 grid
    with pytest.raises(
        InputError,
        match=r"window_size 7x7 is larger than the 4x4 token grid .* use at most 4x4; .*at 4x4 the window is "
        r"softmax computed another way, and one of at most 3 on a side is local$",
    ):
        build_efficient_student(teacher, "window", window_size=7)
    student = build_efficient_student(teacher, "window", window_size=3)
    assert student(torch.randn(1, 3, 64, 64)).shape == (1, 10)  # and local at another size


def test_a_list_of_one_attention_for_a_deeper_teacher_is_counted_in_words():
    with pytest.raises(InputError, match=r"convert.attention lists 1 attention but the teacher has 2 blocks"):
        build_efficient_student(tiny_vit(depth=2, img_size=32, patch_size=8), ["hedgehog"])


def test_a_fresh_student_of_a_family_whose_logits_add_a_bias_takes_no_zoo_attention():
    """model.attention on a BEiT student: its blocks hand the attention their relative-position bias, which a
    zoo attention's forward does not take (a TypeError at the first step); refused where it is built."""
    beit = make_transfer_aware(
        timm.create_model(
            "beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
        )
    )
    with pytest.raises(
        InputError, match=r"blocks.0 is timm.models.beit.Attention, whose logits add a relative"
    ):
        with_attention(beit, "relu_linear")
    assert with_attention(beit, "softmax") is beit  # softmax keeps the family's own layer


@pytest.mark.parametrize(
    "arch,kw",
    [
        (
            "swinv2_tiny_window8_256",
            dict(img_size=32, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)),
        ),
        ("hiera_tiny_224", dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))),
    ],
)
def test_a_family_without_a_conversion_slot_is_told_it_takes_no_zoo_attention(arch, kw):
    """model.attention on Swin V2 or Hiera answered "expected a timm VisionTransformer with .blocks"."""
    with pytest.raises(
        InputError, match=r"takes no zoo attention: its family has no conversion slot .*Swin, PVTv2"
    ):
        with_attention(timm.create_model(arch, **kw), "relu_linear")


def test_hydra_matches_its_formula():
    module = build("hydra").double()
    randomise_new_parameters(module)
    q, k, v = qkv64(module)
    B, H, N, d = q.shape
    flat = [t.transpose(1, 2).reshape(B, N, H * d) for t in (q, k, v)]
    qn, kn = (t / t.norm(dim=-1, keepdim=True) for t in flat[:2])
    expected = module.channel_gain * (H * d / N) * qn * (kn * flat[2]).sum(1, keepdim=True)
    torch.testing.assert_close(module.attend(q, k, v), expected.reshape(B, N, H, d).transpose(1, 2))


def test_attention_built_under_inference_mode_runs_there(name):
    """Weights made under torch.inference_mode keep no version counter: the caches keyed on weight versions
    (agent's position biases, hedgehog's folded projection) must rebuild instead of failing."""
    x = torch.randn(2, N_SMALL, 32)
    reference = build(name).eval()
    with torch.inference_mode():
        module = copy.deepcopy(reference)  # its tensors are inference tensors now
        first, second = module(x), module(x)
    with torch.no_grad():
        torch.testing.assert_close(first, reference(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def fused_adamw_step(module: torch.nn.Module) -> None:
    """One step of torch's fused AdamW on every parameter: it updates the weights in place without bumping
    their version counters, so caches keyed on versions would go stale (as a conversion's stage 1 steps)."""
    params = [p for p in module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    versions = [p._version for p in params]
    torch.optim.AdamW(params, lr=0.05, fused=True).step()
    assert [p._version for p in params] == versions  # the trap this guards against
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


def test_agent_position_biases_follow_a_fused_optimizer_step():
    """Agent keeps its resized position biases between inference calls; a fused AdamW step must refresh them."""
    module = build("agent").eval()
    randomise_new_parameters(module)
    x = torch.randn(2, N_SMALL, 32)
    with torch.no_grad():
        module(x)  # fills the cache
    fused_adamw_step(module)
    with torch.no_grad():
        cached = module(x)
        module._bias_cache = None
        fresh = module(x)
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)


# Performer's fold recovers |k|^2 from u_k through its projection's orthogonal rows, which were drawn in fp32:
# orthogonal to ~1e-7, so its float64 agreement is at that level, not float64's.
FOLD_TOLERANCE = {"hedgehog": 1e-12, "performer": 1e-6}


@pytest.mark.parametrize("name", sorted(FOLD_TOLERANCE))
def test_inference_folds_the_feature_map_into_qkv_and_equals_the_plain_path(name):
    """Without autograd, phi's linear map comes from one projection of x (qkv's q/k rows times the map): the
    same function as q/k then the map, in whole batches and in head groups, and refreshed when a weight
    changes in place (an optimizer step, a redraw of random features)."""
    one_block = {"num_features": 16} if name == "performer" else {}  # head dim 16: m = d folds
    module = build(name, **one_block).double().eval()
    randomise_new_parameters(module)
    x = torch.randn(2, N_SMALL, 32, dtype=torch.float64)
    tol = FOLD_TOLERANCE[name]

    def plain():
        q, k, v = project_qkv(module, x)
        return module.proj(module.attend(q, k, v).transpose(1, 2).reshape(2, N_SMALL, 32))

    for chunk in (module.feature_chunk_elements, 64):  # one batched pass, then one (batch, head) pair a group
        module.feature_chunk_elements = chunk
        with torch.no_grad():
            assert module._folds(x)
            torch.testing.assert_close(module(x), plain(), rtol=tol, atol=tol)
    fused_adamw_step(module)  # changes the weights without bumping their version counters
    if name == "performer":
        module.redraw(torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(module(x), plain(), rtol=tol, atol=tol)
    assert not module._folds(x.requires_grad_())  # a graph takes the plain path (the maps' gradients)
    with_norms = build(name, qk_norm=True, norm_layer=torch.nn.LayerNorm, **one_block)
    assert with_norms.folds() and not with_norms._folds(
        x.detach().float()
    )  # a q/k norm sits between the projection and the maps


def test_performer_folds_only_where_u_k_gives_back_the_key_norm():
    """|k|^2 from u_k needs a square projection with orthogonal rows: i.i.d. rows or m != d run plainly."""
    assert build("performer", num_features=16).folds()  # head dim 16: one orthogonal block
    assert not build("performer", num_features=32).folds()
    assert not build("performer", num_features=16, orthogonal=False).folds()


def test_performer_approximates_softmax_better_with_more_features():
    torch.manual_seed(0)
    teacher = Attention(32, num_heads=2, qkv_bias=True)
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        q, k, _ = teacher.qkv(x).reshape(2, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
        target = softmax_map(q, k)
        errors = []
        for num_features in (8, 32, 128, 512):
            per_seed = [
                (
                    create_attention(
                        "performer", dim=32, num_heads=2, num_features=num_features, feature_seed=seed
                    ).attention_map(q, k)
                    - target
                )
                .abs()
                .sum(-1)
                .mean()
                for seed in range(6)
            ]
            errors.append(torch.stack(per_seed).mean().item())
    for fewer, more in itertools.pairwise(errors):
        assert more < 0.8 * fewer, errors


def test_performer_map_matches_favor_plus_from_first_principles():
    """The implicit map equals the FAVOR+ estimator written out in float64 with natural exp:
    A_ij ~ sum_r exp(w_r.q'_i - |q'_i|^2/2) exp(w_r.k'_j - |k'_j|^2/2), x' = x d^-1/4."""
    module = create_attention("performer", dim=32, num_heads=2, num_features=48, feature_seed=3).double()
    module.eps = 0.0  # the 1e-6 underflow guard is added after the stabiliser shift: leave it out here
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 2, 20, 16, dtype=torch.float64)
    w = module.feature_projection.double()
    scale = 16**-0.25

    def phi(x):
        x = x * scale
        return torch.exp(x @ w.T - x.pow(2).sum(-1, keepdim=True) / 2)

    scores = phi(q) @ phi(k).transpose(-2, -1)
    expected = scores / scores.sum(-1, keepdim=True)
    torch.testing.assert_close(module.attention_map(q, k), expected, rtol=1e-5, atol=1e-8)


def test_performer_orthogonal_features_estimate_the_softmax_kernel_without_bias():
    """FAVOR+ is unbiased only if each w_r is marginally N(0, I): E[exp(w.x - |x|^2/2)^2] = exp(|x|^2). With
    x = e_r / 2 against feature r's own axis (where Householder QR's sign convention pushed w_r), the mean over
    200 draws is exp(1/4) within 4 standard errors (the unsigned QR gave 0.68)."""
    d, blocks = 8, 200
    generator = torch.Generator().manual_seed(0)
    w = efficient.performer.gaussian_orthogonal_features(d * blocks, d, generator=generator).double()
    own = w.view(blocks, d, d).diagonal(dim1=1, dim2=2)  # w_r . e_r
    estimates = torch.exp(0.5 * own - 0.125).pow(2)
    error = estimates.std() / estimates.numel() ** 0.5
    assert abs(estimates.mean() - math.exp(0.25)) < 4 * error, (estimates.mean(), error)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 128])
def test_performer_default_features_are_one_orthogonal_block(head_dim):
    """m = d by default: square, with orthogonal rows, so inference folds it into qkv (see performer.py)."""
    module = create_attention("performer", dim=2 * head_dim, num_heads=2)
    w = module.feature_projection
    assert w.shape == (head_dim, head_dim) and module.folds()
    directions = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(directions @ directions.T, torch.eye(head_dim), atol=1e-4, rtol=0)


def test_performer_features_are_orthogonal_blocks_and_redraw_on_schedule():
    module = build("performer", num_features=40, redraw_interval=2)  # head_dim 16: blocks of 16
    w = module.feature_projection
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    x = torch.randn(1, N_SMALL, 32)
    module.eval()
    first = w.clone()
    module(x), module(x), module(x)
    assert torch.equal(module.feature_projection, first), "eval must keep the features fixed"
    module.train()
    module(x), module(x)
    assert torch.equal(module.feature_projection, first)
    module(x)  # third training forward: redraw
    assert not torch.equal(module.feature_projection, first)
    drawn = module.feature_projection.clone()
    module.redraw()
    assert not torch.equal(module.feature_projection, drawn)


def test_token_layout_inference_and_mismatch():
    module = create_attention("window", dim=16, num_heads=2, window_size=2)
    assert module.token_layout(197) == (1, (14, 14))
    assert module.token_layout(196) == (0, (14, 14))
    module.set_token_layout(1, (4, 5))
    with pytest.raises(ValueError, match="call set_token_layout"):
        module.token_layout(197)


# ----------------------------------------------------------------------------- students


def tiny_teacher(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, num_classes=5, qkv_bias=True, **kwargs
    ).eval()


def test_student_copies_every_counterpart_weight_exactly():
    teacher = tiny_teacher()
    reference = copy.deepcopy(teacher.state_dict())
    student = efficient_student_from_teacher(teacher, "hedgehog")
    student_state = student.state_dict()
    new = dict(new_parameters(student))
    for key, value in reference.items():
        assert torch.equal(student_state[key], value), key
        assert student_state[key].data_ptr() != teacher.state_dict()[key].data_ptr(), (
            f"{key} shared with teacher"
        )
    assert set(student_state) - set(reference) == set(new)
    assert new and all(".attn.feature_map_" in k for k in new)
    for key, value in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(value, reference[key])
    for block in student.blocks:
        assert block.attn.num_prefix_tokens == 1 and block.attn.grid_size == (4, 4)


def test_student_of_a_frozen_teacher_trains_every_parameter():
    teacher = tiny_teacher().requires_grad_(False)  # as load_teacher or a TeacherStudent leaves it
    student = efficient_student_from_teacher(teacher, "hedgehog")
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher stays frozen


def test_student_with_qk_norm_teacher_keeps_norms():
    teacher = tiny_teacher(qk_norm=True)
    student = efficient_student_from_teacher(teacher, "relu_linear")
    for t, s in zip(teacher.blocks, student.blocks):
        assert isinstance(s.attn.q_norm, torch.nn.LayerNorm)
        assert torch.equal(s.attn.q_norm.weight, t.attn.q_norm.weight)


def test_all_softmax_student_reproduces_the_teacher():
    teacher = tiny_teacher()
    student = efficient_student_from_teacher(teacher, "softmax")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(student(x), teacher(x))


def test_mixed_per_layer_student_routes_options():
    teacher = tiny_teacher()
    names = ["window_linear", "linformer", "performer", "softmax"]
    student = efficient_student_from_teacher(teacher, names, window_size=2, num_features=16, proj_len=8)
    assert [b.attn.attention_name for b in student.blocks] == names
    assert student.blocks[0].attn.window_size == (2, 2)
    assert student.blocks[1].attn.seq_len == 17
    assert student.blocks[2].attn.num_features == 16
    assert {n.split(".")[1] for n, _ in new_parameters(student)} == {"0", "1"}
    out = student(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="teacher has 4 blocks"):
        efficient_student_from_teacher(teacher, names[:3])
    with pytest.raises(TypeError, match="no chosen attention accepts option\\(s\\) \\['window_size'\\]"):
        efficient_student_from_teacher(teacher, "performer", window_size=2)


@pytest.mark.parametrize(
    "name, option, too_large, largest, shown",
    [
        ("window", "window_size", 5, 4, "4x4"),
        ("agent", "agent_grid", (2, 5), 4, "4x4"),
        ("nystrom", "num_landmarks", 18, 17, "17"),
        ("linformer", "proj_len", 18, 17, "17"),
        ("focused_linear", "kernel_size", 5, 3, "3"),
    ],
)
def test_a_size_beyond_the_teachers_grid_is_refused_where_the_student_is_built(
    name, option, too_large, largest, shown
):
    """Beyond the grid a window is full attention, more landmarks, agents or projected keys than tokens cost
    more than softmax, a conv's outer taps see only padding: the user asked for an efficient attention, so
    the build refuses it and names the largest size that fits (the core would silently clamp or pay)."""
    teacher = tiny_teacher()  # 4x4 patches + a class token: 17 tokens
    with pytest.raises(
        ValueError, match=rf"^{option} .* larger than the 4x4 token grid .* use at most {shown};"
    ):
        efficient_student_from_teacher(teacher, name, **{option: too_large})
    efficient_student_from_teacher(teacher, name, **{option: largest})


def test_a_window_over_the_whole_grid_is_said_to_be_softmax_where_the_student_is_built(capsys):
    """The default window of 7 on a 7x7 grid (the demo's) converted, timed and reported as an efficient attention
    while it is softmax computed another way: said once per student, not for a window local on a side."""
    efficient_student_from_teacher(tiny_teacher(), "window", window_size=4)  # 4x4 patches + a class token
    err = capsys.readouterr().err
    assert err.count("warning: window_size 4x4 covers the whole 4x4 token grid: window is softmax there") == 1
    assert "a window of at most 3 on a side is local" in err
    for local in (3, (4, 3)):
        efficient_student_from_teacher(tiny_teacher(), "window", window_size=local)
        assert "covers the whole" not in capsys.readouterr().err


def test_a_size_beyond_the_grid_is_left_to_the_core_when_rebuilding_or_at_another_resolution():
    """Only a student being made is refused, and only where its size fits no layer: an export recorded before
    still rebuilds (`swap_attentions`), and a student of a size-free teacher runs at a smaller grid than its
    window (clamped to one window)."""
    rebuilt = swap_attentions(tiny_teacher(), ["linformer"] * 4, [dict(seq_len=17, proj_len=64)] * 4)
    assert torch.isfinite(rebuilt(torch.randn(1, 3, 64, 64))).all()
    student = efficient_student_from_teacher(tiny_teacher(dynamic_img_size=True), "window", window_size=4)
    assert torch.isfinite(student(torch.randn(1, 3, 32, 32))).all()
    # a window of 8 fits the Swin's first stages, and is clamped in the last; 9 fits none
    swin = _swin_8_then_4()
    student = build_efficient_student(swin, "window", window_size=8)
    assert torch.isfinite(student(torch.randn(1, 3, 64, 64))).all()
    with pytest.raises(ValueError, match="window_size 9x9 is larger than the 8x8 token grid"):
        build_efficient_student(swin, "window", window_size=9)


def _window_reference(q, k, v, grid, window):
    """Softmax over the keys in the query's (row // wh, col // ww) window plus the class token (token 0)."""
    rows, cols = torch.arange(grid[0]).repeat_interleave(grid[1]), torch.arange(grid[1]).repeat(grid[0])
    ids = F.pad((rows // window[0]) * 100 + cols // window[1], (1, 0), value=-1)
    keep = (ids[:, None] == ids[None, :]) | (ids[:, None] < 0) | (ids[None, :] < 0)
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return logits.masked_fill(~keep, -math.inf).softmax(-1) @ v


def _agent_reference(q, k, v, grid, agents):
    """softmax(q A^T s) softmax(A k^T s) v, A the means of the grid queries over agents[0] x agents[1] blocks."""
    B, H, _, d = q.shape
    blocks = q[:, :, 1:].reshape(B, H, agents[0], grid[0] // agents[0], agents[1], grid[1] // agents[1], d)
    a = blocks.mean(dim=(3, 5)).reshape(B, H, -1, d) * d**-0.5
    return (q @ a.transpose(-2, -1)).softmax(-1) @ ((a @ k.transpose(-2, -1)).softmax(-1) @ v)


@pytest.mark.parametrize(
    "name, options", [("window", dict(window_size=(4, 3))), ("agent", dict(agent_grid=(4, 3)))]
)
def test_a_dynamic_size_student_lays_a_non_square_image_out_on_its_own_grid(name, options):
    """A 16x9-patch image of a dynamic-size student is 1 + 144 tokens, also 1 + 12x12: its attentions must
    take the grid the image was cut into, not a square one, and match the attention written out for it."""
    student = efficient_student_from_teacher(tiny_teacher(dynamic_img_size=True), name, **options)
    attn, seen = student.blocks[1].attn, {}
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    for size, grid in (((256, 144), (16, 9)), ((128, 96), (8, 6))):  # the grid follows each image
        student(torch.randn(2, 3, *size))
        B, N, C = seen["x"].shape
        q, k, v = attn.qkv(seen["x"]).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        reference = (_window_reference if name == "window" else _agent_reference)(q, k, v, grid, (4, 3))
        expected = attn.proj(reference.transpose(1, 2).reshape(B, N, C))
        torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-4)


def _swin_8_then_4() -> torch.nn.Module:
    """A Swin whose last stage's windows (4x4) are smaller than the first stages' (8x8)."""
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=64,
        embed_dim=16,
        depths=(2, 2, 2),
        num_heads=(1, 2, 4),
        window_size=8,
        num_classes=5,
    )


@pytest.mark.parametrize("term, fits, largest", [("win", 8, 8), ("conv", 7, 7)])
def test_a_formulas_win_or_conv_is_refused_only_where_it_fits_no_layer(term, fits, largest):
    """As the zoo's window and conv kernel: a formula's term that fits the Swin's first stages is clamped in
    the last (a window to the grid, conv taps beyond it see zero padding), not refused there; one fitting no
    layer is refused naming the term as the program writes it and the largest that fits."""
    swin = _swin_8_then_4()
    student = build_efficient_student(swin, f"formula:sum(relu+{term}({fits}))")
    assert torch.isfinite(student(torch.randn(1, 3, 64, 64))).all()
    with pytest.raises(
        ValueError, match=rf"^{term} 9 is larger than the 8x8 token grid .* use at most {largest};"
    ):
        build_efficient_student(swin, f"formula:sum(relu+{term}(9))")


def test_configure_token_layout_reads_the_model():
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(64, 48),
        depth=2,
        reg_tokens=2,
        attn_layer=get_attention_class("window"),
    )
    configure_token_layout(model)
    assert {(b.attn.num_prefix_tokens, b.attn.grid_size) for b in model.blocks} == {(3, (4, 3))}
    assert torch.isfinite(model(torch.randn(1, 3, 64, 48))).all()


@pytest.mark.parametrize("name", [n for n in ALL if n != "linformer"])
def test_timm_create_model_with_attn_layer(name):
    cls = get_attention_class(name)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=3, attn_layer=cls
    )
    assert all(isinstance(b.attn, cls) for b in model.blocks)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("weight_init", ["", "jax"])
def test_timm_init_leaves_new_parameters_at_their_fresh_values(weight_init):
    """timm's ViT init re-initialises Linear/Conv layers; new parameters must keep their own init
    (hedgehog: identity, focused conv: zero, linformer: segment means)."""
    for name, options in (("hedgehog", {}), ("focused_linear", {}), ("linformer", {"seq_len": 17})):
        cls = get_attention_class(name)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=64,
            depth=1,
            weight_init=weight_init,
            attn_layer=attention_layer(name, **options),
        )
        attn = model.blocks[0].attn
        fresh = cls(dim=192, num_heads=3, **options)
        for n in attn.new_parameter_names():
            assert torch.equal(attn.get_parameter(n), fresh.get_parameter(n)), (name, n)


def test_attention_layer_binds_options_for_timm():
    layer = attention_layer("window", window_size=3)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=96, depth=2, attn_layer=layer
    )
    assert all(b.attn.window_size == (3, 3) and b.attn.attention_name == "window" for b in model.blocks)
    assert torch.isfinite(model(torch.randn(1, 3, 96, 96))).all()
    with pytest.raises(TypeError, match="has no option"):
        attention_layer("window", seq_len=5)


@pytest.mark.parametrize("name", ALL)
def test_options_rebuild_the_same_attention(name):
    """``options()`` reports every own option with the value in use: rebuilt from them (and the
    weights), the attention computes the same output. Exported students rely on this."""
    module = build(name)
    randomise_new_parameters(module)
    options = module.options()
    assert sorted(options) == sorted(type(module).own_options())
    json.dumps(options)  # JSON-ready
    twin = create_attention(
        name, dim=32, num_heads=2, qkv_bias=True, num_prefix_tokens=PREFIX, grid_size=GRID, **options
    )
    twin.load_state_dict(module.state_dict())
    assert twin.options() == options
    x = torch.randn(2, N_SMALL, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), module.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_a_converted_student_with_gradient_checkpointing_gets_the_gradients_of_one_without(name):
    """Its blocks recompute in the backward pass (stage 2 with model.grad_checkpointing): the same random
    features, landmarks and captured maps again, so the same gradients (the pair keeps what it lent)."""
    teacher = tiny_vit(depth=2, img_size=64, plain_timm=True)  # an 8 x 8 grid: every zoo default fits
    torch.manual_seed(0)
    student = build_efficient_student(teacher, name)
    grads = []
    for checkpointing in (False, True):
        s = copy.deepcopy(student)
        s.set_grad_checkpointing(checkpointing)
        mode = "distill" if name in list_attentions("row_stochastic") + list_attentions("signed") else "none"
        pair = TeacherStudent(teacher, s, mode=mode).train()
        torch.manual_seed(7)  # the draws of any attention that samples
        with pair.kept_for_backward():
            out = pair(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
            (out.logits.pow(2).mean() + (out.loss if out.loss is not None else 0)).backward()
        grads.append([p.grad for p in s.parameters()])
    assert [g is None for g in grads[0]] == [g is None for g in grads[1]]
    for got, want in zip(grads[1], grads[0]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


class _CosineTemperatureAttention(torch.nn.Module):
    """timm's fused qkv and proj around a learned temperature and normalised q, k: no adapter knows it."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, **kwargs):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = torch.nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.temperature = torch.nn.Parameter(torch.full((num_heads, 1, 1), 10.0))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        maps = (self.temperature * q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((maps @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize(
    "teacher, said",
    [
        (
            lambda: timm.models.VisionTransformer(
                img_size=32,
                patch_size=8,
                embed_dim=48,
                depth=2,
                num_heads=3,
                attn_layer=_CosineTemperatureAttention,
            ),
            "blocks.0.attn is _CosineTemperatureAttention .* attnxfer has no adapter for it",
        ),
        (
            lambda: timm.create_model(
                "beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
            ),
            "whose logits add a relative-position bias",
        ),
    ],
)
def test_a_copy_of_a_teacher_whose_layers_no_zoo_attention_replaces_whole_is_refused(teacher, said):
    """The Python API's copy with attention replaced drops what such layers add (a temperature, a position
    bias): refused as the conversion refuses it, and the teacher given is left as it was."""
    model = teacher()
    kind = type(model.blocks[0].attn)
    with pytest.raises(InputError, match=said):
        efficient_student_from_teacher(model, "performer")
    assert type(model.blocks[0].attn) is kind
