"""Every registered attention compiles as one graph (no graph breaks), and the compiled layer computes what
the eager one does, forward and backward.

``torch._dynamo.explain`` traces without generating code (fast on this CPU); the equality check compiles
with the ``aot_eager`` backend, which runs AOT autograd (the forward and backward graphs, in-place ops
functionalised, as inductor sees them) without inductor's C++/Triton code generation (8 s a graph here).
What inductor then generates is measured by ``benchmarks/attention_zoo.py --compile``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from attnxfer.models.attention.numerics import bf16_devices
from attnxfer.models.efficient import create_attention, list_attentions

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


@pytest.mark.parametrize("name", list_attentions())
def test_attention_traces_as_one_graph(name):
    module = build(name)
    x = torch.randn(2, 21, 32)
    checks = []
    with torch.no_grad():
        checks.append(("eval", dynamo.explain(module.eval())(x)))
    checks.append(("train", dynamo.explain(module.train())(x)))
    with bf16_devices("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU's bf16 path
        checks.append(("bf16", dynamo.explain(module)(x)))
    for mode, explained in checks:
        reasons = [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_break_count == 0, f"{name} ({mode}): graph breaks: {reasons}"
        assert explained.graph_count == 1, f"{name} ({mode}): {explained.graph_count} graphs"


@pytest.mark.parametrize("name", list_attentions())
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
