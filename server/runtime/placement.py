"""Where onnxruntime placed each node of a session, and the rule a CUDA server applies to it.

onnxruntime assigns every node to a provider when the session is created. A node the CUDA
provider cannot run goes to the CPU with a warning that the server's log level hides, and the
model still answers: a convolution on the CPU of a CUDA server is a silent slowdown plus device
copies around it. So a CUDA server reads the placement back at load and refuses (``--device
cuda``) or reports (``auto``) any convolution not on CUDA. Shape arithmetic (Shape, Gather,
Concat on shape tensors) on the CPU is normal: onnxruntime keeps it there on purpose.

Two sources: the session's own record (``get_provider_graph_assignment_info``, recorded when the
session config entry ``session.record_ep_graph_assignment_info`` is "1"), or, where this
onnxruntime has no such record, a profile of one run (``enable_profiling``: each node event names
its provider).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RECORD_KEY = "session.record_ep_graph_assignment_info"
_EVENT_SUFFIXES = ("_kernel_time", "_fence_before", "_fence_after")


@dataclass(frozen=True)
class NodePlacement:
    op_type: str
    name: str
    provider: str


def is_conv(op_type: str) -> bool:
    # Conv, FusedConv, NhwcConv, QLinearConv, ConvInteger, ConvTranspose: every convolution kernel.
    return "conv" in op_type.lower()


def recorded_placement(session: Any) -> list[NodePlacement] | None:
    """The session's record of its node assignment; None where this onnxruntime keeps none."""
    get = getattr(session, "get_provider_graph_assignment_info", None)
    if get is None:
        return None
    try:
        subgraphs = get()
    except Exception:  # recording was not enabled for this session
        return None
    placed = [NodePlacement(n.op_type, n.name, sg.ep_name) for sg in subgraphs for n in sg.get_nodes()]
    return placed or None


def profile_placement(profile: str | Path) -> list[NodePlacement]:
    """Every node of an onnxruntime profile (the JSON ``end_profiling()`` wrote) with its provider."""
    events = json.loads(Path(profile).read_text())
    seen: dict[tuple[str, str], NodePlacement] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") != "Node" or not args.get("op_name") or not args.get("provider"):
            continue
        name = str(event.get("name", ""))
        for suffix in _EVENT_SUFFIXES:
            name = name.removesuffix(suffix)
        seen.setdefault((name, args["provider"]), NodePlacement(args["op_name"], name, args["provider"]))
    return list(seen.values())


def profiled_placement(
    ort_module: Any,
    model: str | bytes,
    sess_options: Any,
    providers: Sequence[Any],
    feed: dict[str, np.ndarray],
) -> list[NodePlacement]:
    """Run ``model`` once in a profiling session (``sess_options`` as the serving one) and read the profile."""
    with tempfile.TemporaryDirectory(prefix="cnn-placement-") as folder:
        sess_options.enable_profiling = True
        sess_options.profile_file_prefix = str(Path(folder) / "placement")
        session = ort_module.InferenceSession(
            model, sess_options=sess_options, providers=list(providers), enable_fallback=0
        )
        session.run(None, feed)
        return profile_placement(session.end_profiling())


def misplaced_convs(
    placed: Sequence[NodePlacement], provider: str = "CUDAExecutionProvider"
) -> list[NodePlacement]:
    return [p for p in placed if is_conv(p.op_type) and p.provider != provider]


def describe(placed: Sequence[NodePlacement]) -> str:
    """'38 nodes on CUDAExecutionProvider, 3 on CPUExecutionProvider (Gather, Shape)'."""
    per_provider = Counter(p.provider for p in placed)
    parts = []
    for i, (provider, n) in enumerate(per_provider.most_common()):
        ops = sorted({p.op_type for p in placed if p.provider == provider})
        what = f" ({', '.join(ops[:6])}{', ...' if len(ops) > 6 else ''})" if i else ""
        parts.append(f"{n} node{'s' if n != 1 else ''} on {provider}{what}")
    return ", ".join(parts) or "no nodes"


def conv_placement_problem(
    placed: Sequence[NodePlacement], provider: str = "CUDAExecutionProvider"
) -> str | None:
    """None when every convolution runs on ``provider``; else which ones do not, and where."""
    wrong = misplaced_convs(placed, provider)
    if not wrong:
        return None
    names = ", ".join(f"{p.name or '?'} ({p.op_type} on {p.provider})" for p in wrong[:5])
    more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
    return f"{len(wrong)} convolution(s) not on {provider}: {names}{more}"
