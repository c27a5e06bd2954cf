"""Students as ONNX graphs, traced from the student itself (any attention, flat or hierarchical) and checked in
ONNX Runtime before they are handed over.

* torch.export (``torch.onnx.export(dynamo=True)``, needs ``onnxscript``) captures every zoo attention, Swin's
  windows included; the TorchScript tracer cannot export agent/Nyström pooling with a free batch axis, nor
  Performer's ``exp2``.
* Opset 18 (`OPSET`): what torch's ONNX op library is written for (a lower one goes through ONNX's version
  converter, which may fail), with LayerNormalization as one node; ONNX Runtime >= 1.14, TensorRT >= 8.6.
* A free batch axis; the image size is the student's own (token grid, position embeddings are fixed by it).
* Checked, not trusted: `onnx.checker` (full), then ONNX Runtime on CPU against the PyTorch forward at batch
  sizes 1 and 3 (neither is the traced 2); a difference above `TOLERANCE` stops the export.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import io
import logging
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import UserError
from ..models.student import attention_layout
from ..run_layout import ONNX_FILE
from ..speak import debug

OPSET = 18
ONNX_DATA_FILE = "model.onnx.data"  # the weights beside the graph, for students over protobuf's 2 GB
INPUT_NAME = "pixel_values"
CHECK_BATCHES = (1, 3)
#: the largest |ONNX Runtime - PyTorch| allowed, as a share of max(1, max |output|)
TOLERANCE = 1e-3
# the packages an ONNX export needs: the exporter's (onnxscript), the checker's and the runtime's
_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class OnnxExportError(UserError, RuntimeError):
    """The student could not become an ONNX graph, or the graph does not compute what the student does."""


@dataclass(frozen=True)
class OnnxReport:
    """What an ONNX export wrote and how well ONNX Runtime reproduces the PyTorch forward."""

    file: str
    opset: int
    input_name: str
    input_shape: list[int | str]  # (batch, C, H, W), batch free
    output_name: str
    output_shape: list[int | str]
    exporter: str
    onnxruntime: str
    provider: str
    check_batches: list[int]
    max_abs_diff: float  # largest |ONNX Runtime - PyTorch| over the check batches
    max_abs_output: float  # largest |PyTorch output|, the scale the difference is measured against
    tolerance: float
    external_data: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_onnx() -> None:
    """Stop before any work when the ONNX packages are missing, saying how to install them."""
    missing = []
    for module in _PACKAGES:
        try:
            installed = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module blocked in sys.modules (None) has no spec either
            installed = False
        if not installed:
            missing.append(module)
    if missing:
        raise UserError(
            f"--format onnx needs {', '.join(missing)}: pip install 'attnxfer[onnx]' "
            f"(or pip install {' '.join(_PACKAGES)})"
        )


def _trace(model: nn.Module, x: torch.Tensor, path: Path, output_name: str) -> None:
    """``model`` as ``path`` through torch.export, the batch axis free (weights over protobuf's 2 GB go to
    ``path.data`` beside it: the exporter decides)."""
    batch = torch.export.Dim("batch")
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        # torch.export's notes on the trace, and the partial graph it prints when it fails, are not the
        # user's business: a refusal says in one line what failed and where
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
    finally:
        torch_log.setLevel(level)


def _reason(e: BaseException) -> str:
    """The exporter's failure in one line: the innermost cause (torch.onnx wraps torch.export's) and, where
    torch.export names it, the line of model code that raised."""
    inner = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    reason = f"{type(inner).__name__}: {lines[0][:200] if lines else ''}"
    where = re.search(
        r'The following call raised this error:\s*File "([^"]+)", line (\d+), in \w+\s*(.*)', str(e)
    )
    if where:
        reason += f" at {Path(where[1]).name}:{where[2]} `{where[3].strip()[:100]}`"
    return reason


def write_onnx(model: nn.Module, folder: str | Path, *, input_size: tuple[int, int, int]) -> OnnxReport:
    """Write ``model`` as ``folder/model.onnx`` and check it with `onnx.checker` and in ONNX Runtime on CPU;
    ``max|diff| <= TOLERANCE * max(1, max|output|)`` or the export stops (`OnnxExportError`)."""
    require_onnx()
    import onnx
    import onnxruntime as ort

    folder = Path(folder)
    path = folder / ONNX_FILE
    # the student on the CPU in fp32, eval mode, no gradients: the caller's model stays as it was
    twin = copy.deepcopy(model).cpu().float().eval().requires_grad_(False)
    out_name = "logits" if getattr(twin, "num_classes", 0) else "features"
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    try:
        _trace(twin, example, path, out_name)
    except Exception as e:  # the exporter's own: say which student (its attentions) and why, in one line
        try:
            what = f"{type(twin).__name__} with {', '.join(sorted(set(attention_layout(twin))))} attention"
        except (TypeError, ValueError):
            what = type(twin).__name__
        raise OnnxExportError(
            f"the {what} cannot be exported to ONNX ({_reason(e)}); export it in timm's format "
            "instead (--format timm) and load it with attnxfer.load_student"
        ) from e
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"the exported graph fails onnx.checker: {_reason(e)}") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the session's notes on its own optimisations are noise
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    diff = scale = 0.0  # max |ORT - torch| and max |torch| over `CHECK_BATCHES` seeded images
    for i, batch in enumerate(CHECK_BATCHES):
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(1 + i))
        with torch.no_grad():
            want = twin(x).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        if got.shape != want.shape:
            raise OnnxExportError(
                f"ONNX Runtime gives shape {got.shape} at batch {batch}, PyTorch {want.shape}: the graph "
                "did not keep the batch axis free"
            )
        diff = max(diff, float(abs(got - want).max()))
        scale = max(scale, float(abs(want).max()))
    if not diff <= TOLERANCE * max(1.0, scale):  # also stops a NaN
        raise OnnxExportError(
            f"ONNX Runtime's output differs from PyTorch's by up to {diff:.3g} (outputs up to {scale:.3g}; "
            f"tolerance {TOLERANCE:g} of that): the graph does not compute what the student computes"
        )
    with torch.no_grad():
        out_shape = ["batch", *twin(example[:1]).shape[1:]]
    debug(f"ONNX export: {path}, max |ORT - torch| {diff:.3g}")
    return OnnxReport(
        file=ONNX_FILE,
        opset=OPSET,
        input_name=INPUT_NAME,
        input_shape=["batch", *input_size],
        output_name=out_name,
        output_shape=out_shape,
        exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}, "
        f"onnx {_version('onnx')}, onnxscript {_version('onnxscript')}",
        onnxruntime=_version("onnxruntime"),
        provider="CPUExecutionProvider",
        check_batches=list(CHECK_BATCHES),
        max_abs_diff=diff,
        max_abs_output=scale,
        tolerance=TOLERANCE,
        external_data=ONNX_DATA_FILE if (folder / ONNX_DATA_FILE).exists() else None,
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
