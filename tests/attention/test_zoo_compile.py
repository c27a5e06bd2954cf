"""Every registered attention compiles as one graph (no graph breaks), and the compiled layer computes what
the eager one does, forward and backward.

``torch._dynamo.explain`` traces without generating code (fast on this CPU), for inference and bf16; the
equality check compiles the training graph with ``fullgraph=True`` (a graph break fails it: it is that graph's
one-graph check) and the ``aot_eager`` backend, which runs AOT autograd (the forward and backward graphs,
in-place ops functionalised, as inductor sees them) without inductor's C++/Triton code generation (8 s a
graph here).
What inductor then generates is measured by ``benchmarks/attention_zoo.py --compile``.

A converted student under ``model.compile: true`` (`attnxfer.train.compile.compile_blocks`, inductor, the way
`attnxfer train` and stage 2 of `attnxfer convert` compile) is checked end to end once: a training step's loss
and gradients equal eager ones, one graph per attention kind for all blocks, no graph break, no recompile.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from helpers import fast_cells, is_compiled

from attnxfer.models.attention.numerics import bf16_devices
from attnxfer.models.efficient import create_attention, list_attentions
from attnxfer.models.efficient.swap import build_efficient_student, set_drop_path
from attnxfer.train.compile import compile_blocks
from attnxfer.transfer import TeacherStudent, build_plan

pytestmark = pytest.mark.usefixtures("inductor_in_process")  # tests/conftest.py

OPTIONS = {
    "window": dict(window_size=2),
    "window_linear": dict(window_size=2),
    "agent": dict(agent_grid=(2, 3), bias_grid=3),
    "nystrom": dict(num_landmarks=5),
    "linformer": dict(seq_len=21, proj_len=6),
    "performer": dict(num_features=24, feature_seed=0),
    "focused_linear": dict(kernel_size=3),
}


@pytest.fixture(autouse=True)
def one_thread_fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dynamo.reset()
    yield
    dynamo.reset()
    torch.set_num_threads(threads)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    module = create_attention(
        name,
        dim=32,
        num_heads=2,
        qkv_bias=True,
        num_prefix_tokens=1,
        grid_size=(4, 5),
        **OPTIONS.get(name, {}),
    )
    with torch.no_grad():  # off the zero / identity inits, so every parameter matters
        for pname in getattr(module, "new_parameter_names", list)():
            module.get_parameter(pname).add_(0.1 * torch.randn_like(module.get_parameter(pname)))
    return module


@pytest.mark.parametrize("name", fast_cells(list_attentions(), ("none", "softmax", "hydra")))
def test_attention_traces_as_one_graph(name):
    """Inference (eval, no grad) and the GPU's bf16 autocast, per attention. The fp32 training graph (train
    mode, autograd) is `test_compiled_layer_matches_eager_forward_and_backward`'s ``fullgraph=True`` compile,
    which fails on any graph break, for every attention but ``none``: that one is traced here."""
    module = build(name)
    x = torch.randn(2, 21, 32)
    checks = []
    with torch.no_grad():
        checks.append(("eval", dynamo.explain(module.eval())(x)))
    module.train()
    if name == "none":  # not in the compiled-layer test (nothing to differentiate)
        checks.append(("train", dynamo.explain(module)(x)))
    with bf16_devices("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU's bf16 path
        checks.append(("bf16", dynamo.explain(module)(x)))
    for mode, explained in checks:
        reasons = [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_break_count == 0, f"{name} ({mode}): graph breaks: {reasons}"
        assert explained.graph_count == 1, f"{name} ({mode}): {explained.graph_count} graphs"


@pytest.mark.parametrize(
    "name", fast_cells([n for n in list_attentions() if n != "none"], ("softmax", "relu_linear"))
)  # none: nothing to differentiate
def test_compiled_layer_matches_eager_forward_and_backward(name):
    module = build(name).train()
    x = torch.randn(2, 21, 32, requires_grad=True)
    weights = torch.randn(2, 21, 32)
    eager_out = module(x)
    (eager_out * weights).sum().backward()
    eager_grads = [p.grad.clone() for p in module.parameters()] + [x.grad.clone()]
    module.zero_grad()
    x.grad = None
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (out * weights).sum().backward()
    grads = [p.grad for p in module.parameters()] + [x.grad]
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# -- a converted student under model.compile ----------------------------------------------------------------


def _student_step(pair: TeacherStudent, x: torch.Tensor):
    """One training step's loss (task stand-in + the plan's terms) and the student's gradients."""
    out = pair(x)
    loss = out.logits.logsumexp(-1).mean() + out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pair.student.named_parameters() if p.grad is not None}
    pair.student.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _converted_pair(teacher, drop_path_rate: float, dtype=torch.float32) -> TeacherStudent:
    """A 4-block student converted to relu_linear / agent alternately (a kernel core; two softmaxes through
    pooled agents with resized position biases), distilling the teacher's maps and logits."""
    torch.manual_seed(0)
    student = build_efficient_student(teacher, ["relu_linear", "agent"] * 2, agent_grid=2, bias_grid=2)
    student = set_drop_path(student, drop_path_rate)
    with torch.no_grad():  # the agents' position biases off their zero init
        for name, p in student.named_parameters():
            if "bias" in name and p.ndim == 4:
                p.add_(0.1 * torch.randn_like(p))
    teacher, student = teacher.to(dtype), student.to(dtype)
    return TeacherStudent(teacher, student, build_plan(teacher, student, "distill", logit_weight=1.0)).train()


@pytest.mark.slow  # inductor: two graphs, ~15 s on a cold cache, ~5 s warm
def test_compiled_converted_student_trains_like_the_eager_one():
    """`compile_blocks` (inductor, as model.compile: true) on a converted student with stochastic depth 0.1
    (every block its own rate): the four blocks share two graphs (one per attention kind), with no graph
    break, and later steps compile nothing new, also with other rates (they are graph inputs).

    Values, with the rates set to 0 (keep = 1: compiled and eager RNG streams differ by design): the loss
    equals eager's, and the gradients are as close to a float64 step's as eager's are. fp32 eager is itself
    ~4e-4 (of each tensor's largest entry) from float64 here, since the map CE through four layers amplifies
    rounding; the compiled step must be within 2e-3 (a wrong graph is off by O(1))."""
    import copy

    from helpers import peaked_teacher
    from torch._dynamo.utils import counters

    teacher = peaked_teacher(depth=4)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss_e, grads_e = _student_step(_converted_pair(teacher, 0.0), x)
    loss_64, grads_64 = _student_step(_converted_pair(copy.deepcopy(teacher), 0.0, torch.float64), x.double())

    pair = _converted_pair(teacher, 0.1)
    student = pair.student
    names = list(student.state_dict())
    assert compile_blocks(student.blocks) == 4 and all(is_compiled(b) for b in student.blocks)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    _student_step(pair, x)  # rates 0, 0.033, 0.067, 0.1
    assert counters["stats"]["unique_graphs"] == graphs + 2  # one per attention kind, not one per block
    for block in student.blocks:
        block.drop_path1.keep_prob.fill_(1.0)
        block.drop_path2.keep_prob.fill_(1.0)
    loss_c, grads_c = _student_step(pair, x)
    assert counters["stats"]["unique_graphs"] == graphs + 2  # no recompile for new rates
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    assert list(student.state_dict()) == names  # checkpoints and export see the eager names

    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c.double(), loss_64, rtol=1e-5, atol=1e-6)
    assert grads_e.keys() == grads_c.keys() == grads_64.keys()
    assert any("agent_key_bias" in n for n in grads_c)
    for name, want in grads_64.items():
        scale = want.abs().max()
        for got in (grads_e[name], grads_c[name]):
            error = (got.double() - want).abs().max()
            assert error <= 2e-3 * scale + 1e-7, f"{name}: {error / scale:.2e} of its largest entry"
