"""Static TensorRT compatibility of ONNX graphs, checked on any machine (no TensorRT, no GPU).

    python export/trt_support.py ENGINE_DIR_OR_ONNX [...]

Against the ONNX parser's support matrix kept as data in ``data/trt_onnx_ops.json``
(onnx-tensorrt ``docs/operators.md`` of TensorRT 10, source named in the file):

- the default-domain opset is in the parser's range and no custom domain is used;
- every op is supported, its input element type is one the parser lists for it, and the
  restrictions that can be checked mechanically hold (constant axes, attribute values,
  unused extra outputs);
- no output shape depends on input *values*: shapes must follow from input shapes alone,
  so the runtime can size outputs from ``context.get_tensor_shape`` and one CUDA-graph
  capture of the decoder step serves every step;
- int64 graph inputs are only those in ``INT64_INPUTS``, each with its reason.

``fp32_islands`` names the nodes an FP16 build keeps in FP32; ``to_trt.py`` and
``fp16_check.py`` share it so the GPU build and the CPU risk check use the same islands.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

SUPPORT_FILE = Path(__file__).with_name("data") / "trt_onnx_ops.json"
TRT_GRAPHS = ("prefill", "decoder_step", "latent_head", "postnet", "vocoder")

# TensorRT 10 takes INT64 I/O natively (the table lists INT64 for the ops these feed).
# Casting to int32 would need a second graph signature for ORT and the reference.
INT64_INPUTS = {
    "text": "token ids [B, Lx]; only indices of the embedding Gather, which takes INT64 indices",
    "position": "one index; feeds the position-table Gather and GreaterOrEqual against a Range over "
                "the past length (both list INT64); lives in a fixed device buffer so a CUDA-graph "
                "replay reads each step's value",
}

TYPE_LABELS = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.INT4: "INT4",
}
# The input whose element type the table's "Supported Types" refers to (default: input 0).
TYPED_INPUT = {"Where": 1}
UNTYPED_OPS = {"Constant", "ConstantOfShape"}  # the table's types describe their outputs

# Inputs that set an output's shape: a value-derived tensor there makes the shape data-dependent.
SHAPE_INPUTS = {
    "Reshape": [1], "Expand": [1], "Tile": [1], "ConstantOfShape": [0], "Range": [0, 1, 2],
    "Slice": [1, 2, 3, 4], "Pad": [1, 3], "Resize": [1, 2, 3], "Upsample": [1], "OneHot": [1],
    "TopK": [1], "Split": [1], "Squeeze": [1], "Unsqueeze": [1], "CumSum": [1], "EyeLike": [0],
}
DATA_DEPENDENT_OPS = {"NonZero", "Unique", "Compress", "NonMaxSuppression"}  # output size = f(values)
CONST, SHAPE, DATA = 0, 1, 2  # what a tensor's values depend on: nothing, input shapes, input values

ISLAND_OPS = {"LayerNormalization", "Softmax"}
STOP_OUTPUT = "stop_logit"
STOP_PASS_THROUGH = {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity", "Add"}


class TrtCompatibilityError(ValueError):
    """A graph TensorRT's ONNX parser would reject (or that the TRT runtime cannot drive)."""


@dataclass(frozen=True)
class Issue:
    graph: str
    node: str  # node name, or the graph input / opset concerned
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.node}: {self.message}"


@functools.cache
def support_table() -> dict:
    """The parser support matrix (``data/trt_onnx_ops.json``)."""
    return json.loads(SUPPORT_FILE.read_text())


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor, from shape inference plus inputs and initializers."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update((t.name, t.data_type) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors known at build time: initializers, Constant outputs and Identity copies of them."""
    known = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in known):
            known.update(node.output)
    return known


def _check_rules(node: onnx.NodeProto, rules: dict, constants: set[str], used: set[str]) -> list[str]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    problems = []
    for i in rules.get("constant_inputs", []):
        if i < len(node.input) and node.input[i] and node.input[i] not in constants:
            problems.append(f"input {i} ({node.input[i]}) must be a build-time constant")
    for name, value in rules.get("attr_equals", {}).items():
        if name in attrs and attrs[name] != value:
            problems.append(f"attribute {name}={attrs[name]!r} must be {value!r}")
    for name, allowed in rules.get("attr_in", {}).items():
        if name in attrs and attrs[name] not in allowed:
            problems.append(f"attribute {name}={attrs[name]!r} must be one of {allowed}")
    for name in rules.get("attr_all_ones", []):
        if name in attrs and any(v != 1 for v in attrs[name]):
            problems.append(f"attribute {name}={attrs[name]} must be all ones")
    for name in rules.get("attr_absent", []):
        if name in attrs:
            problems.append(f"attribute {name} is unsupported")
    limit = rules.get("max_outputs")
    if limit is not None and any(out and out in used for out in node.output[limit:]):
        problems.append(f"only the first {limit} output(s) may be used")
    return problems


def _data_dependent_shapes(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, str]]:
    """Nodes whose output shape would depend on the values (not shapes) of graph inputs."""
    kind = {t.name: CONST for t in graph.initializer}
    kind.update((v.name, DATA) for v in graph.input if v.name not in kind)
    found = []
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type in ("Shape", "Size"):
            out_kind = SHAPE
        else:
            out_kind = max((kind.get(name, CONST) for name in node.input if name), default=CONST)
        if node.op_type in DATA_DEPENDENT_OPS:
            found.append((node, f"{node.op_type} has an output size set by input values"))
        for i in SHAPE_INPUTS.get(node.op_type, []):
            if i < len(node.input) and kind.get(node.input[i], CONST) == DATA:
                found.append((node, f"input {i} ({node.input[i]}) sets the output shape from input values"))
        if node.op_type.startswith("Reduce") and len(node.input) > 1 and kind.get(node.input[1]) == DATA:
            found.append((node, "reduction axes come from input values"))
        kind.update((out, out_kind) for out in node.output)
    return found


def check_model(model: onnx.ModelProto, name: str) -> list[Issue]:
    """Every reason TensorRT 10 (parser and our runtime) would not take ``model``; empty when fine."""
    table = support_table()
    ops = table["operators"]
    issues = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if not table["opset_min"] <= opset.version <= table["opset_max"]:
                issues.append(Issue(name, f"opset {opset.version}", f"outside the parser's range "
                                    f"{table['opset_min']}..{table['opset_max']}; re-export with --opset 17"))
        else:
            issues.append(Issue(name, f"domain {opset.domain}", "custom-domain ops need TensorRT plugins"))

    graph = model.graph
    types = _value_types(model)
    constants = _constants(graph)
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        label = node.name or node.output[0]
        entry = ops.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if entry is None or not entry["supported"]:
            issues.append(Issue(name, label, f"op {node.op_type} is not supported by TensorRT's ONNX parser"))
            continue
        index = TYPED_INPUT.get(node.op_type, 0)
        if node.op_type not in UNTYPED_OPS and index < len(node.input) and node.input[index]:
            elem = TYPE_LABELS.get(types.get(node.input[index]), "unknown")
            if elem not in entry.get("types", []) and elem != "unknown":
                issues.append(Issue(name, label, f"{node.op_type} on {elem} (TensorRT takes {entry['types']})"))
        issues += [Issue(name, label, f"{node.op_type}: {p}")
                   for p in _check_rules(node, entry.get("checks", {}), constants, used)]

    issues += [Issue(name, node.name or node.output[0], why) for node, why in _data_dependent_shapes(graph)]
    for value in [*graph.input, *graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem == onnx.TensorProto.INT64 and value.name not in INT64_INPUTS:
            issues.append(Issue(name, value.name, "int64 graph I/O without a documented reason (INT64_INPUTS)"))
        elif elem not in TYPE_LABELS:
            issues.append(Issue(name, value.name, f"element type {onnx.TensorProto.DataType.Name(elem)} "
                                "is not a TensorRT type"))
    return issues


def check_engine_dir(directory: str | Path) -> list[Issue]:
    """Check every graph of an engine directory that ``to_trt.py`` builds."""
    from melle.core.manifest import read_manifest

    manifest = read_manifest(directory)
    return [issue for name in TRT_GRAPHS if name in manifest.graphs
            for issue in check_model(onnx.load(str(manifest.graph_path(name))), name)]


def require_compatible(directory: str | Path) -> None:
    """Raise ``TrtCompatibilityError`` listing every issue of the engine directory."""
    issues = check_engine_dir(directory)
    if issues:
        raise TrtCompatibilityError(f"{len(issues)} TensorRT compatibility issue(s) in {directory}:\n"
                                    + "\n".join(f"  {i}" for i in issues))


def fp32_islands(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes an FP16 build keeps in FP32 (DESIGN.md "FP16").

    LayerNormalization and Softmax (their reductions overflow or lose the small terms in
    FP16); the Exp of exp(0.5 * logvar) with the Mul that scales its input and the Mul
    that applies it to eps (exp overflows FP16 above 11); and the stop head: the nodes
    from the ``stop_logit`` output back to its Gemm/MatMul (a logit near the threshold
    must not flip with FP16 rounding).
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constants(graph)

    islands = {node.name for node in graph.node if node.op_type in ISLAND_OPS}
    for node in graph.node:
        if node.op_type == "Exp":
            islands.add(node.name)
            scale = producer.get(node.input[0])
            if scale is not None and scale.op_type in ("Mul", "Div"):
                islands.add(scale.name)
            islands.update(c.name for c in consumers.get(node.output[0], []) if c.op_type == "Mul")

    if any(o.name == STOP_OUTPUT for o in graph.output):
        node = producer.get(STOP_OUTPUT)
        while node is not None:
            islands.add(node.name)
            if node.op_type not in STOP_PASS_THROUGH:  # reached the head's Gemm / MatMul
                break
            source = next((i for i in node.input if i and i not in constants), None)
            node = producer.get(source)
    return islands


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", help="engine directories or .onnx files")
    args = p.parse_args(argv)
    issues = []
    for target in map(Path, args.targets):
        issues += (check_engine_dir(target) if target.is_dir()
                   else check_model(onnx.load(str(target)), target.stem))
    for issue in issues:
        print(issue)
    table = support_table()
    print(f"{len(issues)} issue(s) against the TensorRT {table['tensorrt']} parser table "
          f"(opset {table['opset_min']}..{table['opset_max']}; {SUPPORT_FILE.name})")
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
