"""4-bit ONNX weights (MatMulNBits) through onnxruntime's own ``MatMulNBitsQuantizer``, applied to the
exported fp32 graph: every MatMul with a constant weight (each factor of a pair, and any dense
linear) becomes one ``com.microsoft::MatMulNBits`` node, 4-bit in blocks of ``group_size`` input
rows with one scale (stored fp16, fp32 once loaded) and one 4-bit zero point each, accuracy level 4 (activations quantized to
int8 per block at run time, as ExecuTorch's 8da4w does). A factor pair stays two nodes: the
quantizer rewrites nodes one by one and never multiplies two weights together.

Decisions, measured on the shipped model compressed for math (feature 0.4, 3 parity prompts, 69
positions, one thread; docs/measurements.md has the table):
- asymmetric (a zero point per block): top-1 agreement with PyTorch 75% and max |logit diff| 4.2
  against 67% and 5.3 for symmetric (the int4 bound is 60%), for 2.5% more bytes;
- accuracy level 4 (int8 activations, MLAS's CompInt8 kernels): 1.9-2.8x the decode speed of
  level 0 (fp32 activations) there, with the same agreement;
- a K (input width: the rank, for an ``up``) that is not a multiple of the block is handled by the
  library and the kernel: the last block of each column is zero-padded inside the packed weight
  (``k_blocks = ceil(K / block)``), so no rank is padded in the graph and nothing falls back;
- a bias Add after a MatMulNBits (``feature``'s q/k/v and gate/up pairs; o/down's are already in the
  norms in the fused graph) becomes the node's own ``bias`` input: one node fewer per bias at decode;
- then the quantized nodes that read one input (q/k/v's and gate/up's first stages) are stacked
  into one node and a ``Split`` (export/onnx_fused_inputs.py): 90 nodes fewer per token on
  SmolLM2 at 40% + head, decode 1.09x interleaved, the same numbers;
- the head: 8-bit MatMulNBits (the same quantizer, ``bits=8``), as the head decides the token. In
  optimum's graph a tied head reads the embedding table through a Transpose, which the quantizer
  cannot see as a constant weight; the transposed table is given to the head as its own initializer
  first. In the fused graph (the model builder's) the head holds the table and the lookup reads it
  through a Transpose; once the head is 8-bit, the lookup becomes a ``GatherBlockQuantized`` over the
  head's own 8-bit blocks, as the builder does for a quantized tied head: one 8-bit table for both;
- a factored head (``compress --head-rank``): both of its MatMuls ``head_bits``; the tied V x r table
  is the ``up``'s weight and the lookup reads its blocks as above, then the lookup's own r -> hidden
  projection, kept fp32 (tiny, and no activation quantization of its own on any token);
- scales: stored fp16, each tensor behind one Cast to fp32 that onnxruntime folds into a constant
  when the session is made (before the kernels prepack), so decoding is unchanged: on SmolLM2's dense
  int4 folder the file shrinks 103.2 -> 94.8 MB (8%) and the optimized graph has no added Cast;
- a checkpoint healed through the 4-bit weights (``healed_group``): the decoder's nodes are not the
  quantizer's but written here with the codes and scales healing trained through
  (``_healed_matmul_nbits``), symmetric and without zero points; on SmolLM2 at 40% + head, healed
  per channel, ``compare`` exact match 96% against 78% with the quantizer's blocks, decode 1.09-1.14x
  interleaved (fewer scale bytes, no zero points) and a 2% smaller file; a per-channel row is stored
  in the block MLAS runs fastest (``channel_block``: fewer blocks, the last zero-padded), decode
  1.106x interleaved against the largest exact block, in a 3% larger file;
- the codes: each weight rounded to its nearest code at the quantizer's blocks, or, for a checkpoint
  not healed through int4 (the export's default there, ``--int4-rounding``), chosen again by GPTQ at
  the same blocks once the graph is finished (``reround``, export/onnx_int4_gptq.py): same file, nodes
  and kernels;
- the token embedding of an untied model: 4-bit ``GatherBlockQuantized`` (blocks of ``group_size`` along the hidden
  axis), the only Gather quantization the library has (no 8-bit); it halves the shipped model's
  int4 file (7.6 -> 4.0 MB) with no loss of agreement. The library moves the graph from opset 18 to
  21 for the int4 tensor type; the export's checker, shape inference and parity run on the result.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankdown.errors import RankdownError
from rankdown.export.onnx_fused_inputs import fuse_shared_inputs
from rankdown.int4_numerics import group_for, group_label

LOGITS = "logits"
ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations per block (MLAS's CompInt8 kernels on CPU)
SYMMETRIC = False
FP16_SCALES = True
QUANTIZER = "onnxruntime MatMulNBitsQuantizer"
CHANNEL_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits' blocks MLAS has kernels for
BLOCK_COST = 32  # a per-channel row's block: the cost of one more block, in input elements (see channel_block)


@dataclass(frozen=True)
class Int4Summary:
    """What the quantizer did, for the manifest."""

    int4_matmuls: int  # MatMuls now 4-bit MatMulNBits
    fused_input_linears: int  # MatMulNBits nodes that now run as rows of another's node (export/onnx_fused_inputs.py)
    folded_biases: int  # bias Adds now the MatMulNBits' own bias input
    partial_blocks: int  # of the int4 MatMuls, with an input width K that is not a multiple of the block (zero-padded last block)
    head: str  # how the head is stored
    embedding: str  # how the token lookup is stored
    block_size: int  # the export's group: the head's and the lookup's blocks
    block_sizes: dict[int, int]  # the decoder MatMuls' blocks: block -> how many
    symmetric: bool
    accuracy_level: int
    scales: str  # how the block scales are stored
    scheme: str = QUANTIZER  # who chose the decoder's codes and scales
    gptq: dict | None = None  # where GPTQ picked codes at those scales: its summary (export/int4_gptq.py gptq_record)

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "int4_matmuls": self.int4_matmuls,
                "fused_input_linears": self.fused_input_linears,
                "folded_biases": self.folded_biases,
                "partial_last_block": self.partial_blocks, "head": self.head, "embedding": self.embedding,
                "block_size": self.block_size,
                "decoder_block_sizes": {str(b): n for b, n in self.block_sizes.items()},  # JSON keys
                "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level,
                "scales": self.scales, **({"gptq": self.gptq} if self.gptq else {})}


def _head_node(graph):
    """The MatMul that writes the logits (the head), or None when the graph has none."""
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(LOGITS)
    # optimum's head is a MatMul straight into the output; tolerate a Cast/Identity after it.
    while node is not None and node.op_type in ("Cast", "Identity"):
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type == "MatMul" else None


def _untie_head(graph, head) -> bool:
    """A head that reads the embedding table through a Transpose gets the transposed table as its own
    initializer (the quantizer only quantizes constant weights). Returns whether it did."""
    import numpy as np
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    if head.input[1] in initializers:
        return False
    producer = next((n for n in graph.node if head.input[1] in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in initializers:
        return False
    table = numpy_helper.to_array(initializers[producer.input[0]])
    if table.ndim != 2:
        return False
    name = f"{producer.input[0]}.head_transposed"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
    head.input[1] = name
    if not any(producer.output[0] in n.input for n in graph.node) and producer.output[0] not in \
            {o.name for o in graph.output}:
        graph.node.remove(producer)
    return True


def _tied_lookup(graph, table: str) -> tuple[Any, Any] | None:
    """The fused graph's tied lookup: ``Gather(Transpose(table), input_ids)``; (transpose, gather) or None."""
    transpose = next((n for n in graph.node if n.op_type == "Transpose" and list(n.input) == [table]), None)
    if transpose is None:
        return None
    users = [n for n in graph.node if transpose.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != transpose.output[0]:
        return None
    return transpose, users[0]


def _lookup_from_quantized_head(graph, head, table: str, transpose, gather, block_size: int, bits: int) -> None:
    """Point the tied lookup at the head's quantized weight (``bits``), as onnxruntime-genai's builder does for a
    quantized tied head: MatMulNBits stores the head (N = vocab) row by row in blocks along the hidden
    axis, which is the layout ``GatherBlockQuantized`` (gather axis 0, quantize axis 1) reads, 4-bit
    values two to a byte as MatMulNBits packs them. The fp32 table is then dropped: it is stored once."""
    import numpy as np
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    weight, scales = head.input[1], head.input[2]
    zero_points = head.input[3] if len(head.input) > 3 and head.input[3] else ""
    vocab, blocks, blob = initializers[weight].dims
    hidden = int(initializers[table].dims[0])  # the head's weight is (hidden, vocab)
    base = gather.name.rsplit("/", 1)[0]
    shape = f"{base}/quantized_table_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([vocab, blocks * blob], "int64"), shape))
    flat = f"{base}/Reshape/output_0"
    nodes = [helper.make_node("Reshape", [weight, shape], [flat], name=f"{base}/Reshape")]
    padded = blocks * block_size != hidden
    lookup_out = f"{base}/GatherBlockQuantized/output_0" if padded else gather.output[0]
    nodes.append(helper.make_node("GatherBlockQuantized", [flat, gather.input[1], scales] + ([zero_points] if zero_points else []),
                                  [lookup_out], name=f"{base}/GatherBlockQuantized", domain="com.microsoft",
                                  bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1))
    if padded:  # the last block of each row is zero-padded: cut the lookup back to the hidden size
        bounds = [(f"{base}/slice_{k}", np.array([v], "int64")) for k, v in (("start", 0), ("end", hidden), ("axis", -1))]
        graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in bounds)
        nodes.append(helper.make_node("Slice", [lookup_out] + [n for n, _ in bounds], [gather.output[0]],
                                      name=f"{base}/Slice"))
    at = min(list(graph.node).index(gather), list(graph.node).index(transpose))
    graph.node.remove(gather)
    graph.node.remove(transpose)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    if not any(table in n.input for n in graph.node):
        graph.initializer.remove(initializers[table])


def _factored_head_down(head, weighted) -> list:
    """A factored head's ``down`` (compress --head-rank): the MatMul with a constant weight that feeds
    the head, which is then its ``up``; [] for a dense head (fed by the final norm)."""
    producer = next((n for n in weighted if head.input[0] in n.output), None)
    return [] if producer is None else [producer]


def _lookup_projection(tied_lookup, weighted) -> list:
    """A factored tied table's lookup projection (r -> hidden), the MatMul that reads the lookup's
    Gather: left in fp32 (a few hundred KB), as the ExecuTorch int4 export leaves it (export/et_int4.py),
    so the lookup adds no activation quantization of its own; [] otherwise."""
    if tied_lookup is None:
        return []
    gather = tied_lookup[1]
    return [n for n in weighted if n.input[0] == gather.output[0]]


def channel_block(k: int, block_cost: int = BLOCK_COST) -> int:
    """The block a per-channel row of width ``k`` is stored in (its one scale repeated per block): the
    one of ``CHANNEL_BLOCKS`` with the least ``blocks * block_cost + padded width``. MLAS's int8
    kernels pay per block (an activation scale, a float multiply-add) as well as per weight byte,
    so a 576-wide row runs faster as 5 blocks of 128, the last half zero-padded, than as 9 of 64."""
    return min(CHANNEL_BLOCKS, key=lambda b: (-(-k // b) * (block_cost + b), -b))


def _healed_matmul_nbits(graph, nodes: list, group: int, accuracy_level: int, block_cost: int) -> dict[str, int]:
    """Each of ``nodes`` (MatMuls with a constant weight) becomes a 4-bit ``MatMulNBits`` holding the
    integers and scales the int4 export computes for it (rankdown/int4_numerics.py: symmetric,
    max |w| / 7.5, in ``int4_rounding``'s group, bf16 scales with several groups per row), the
    weights ``compress --heal-quantize`` trained through, instead of the asymmetric blocks onnxruntime's
    quantizer would choose. No zero points (the operator's default, 8, is the symmetric code's zero).
    A row of one group (per channel) is stored in ``channel_block``'s block for K, its scale repeated
    per block. MatMuls that share a weight share its 4-bit tensors. Returns each node's name -> its block."""
    import numpy as np
    import torch
    from onnx import helper, numpy_helper

    from rankdown.int4_numerics import int4_rounding, symmetric_int4

    initializers = {init.name: init for init in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    blocks: dict[str, int] = {}
    written: dict[str, tuple[Any, int]] = {}  # weight -> (its MatMulNBits, block): MatMuls sharing it share those
    sharing = Counter(node.input[1] for node in nodes)
    for node in nodes:
        if node.input[1] in written:
            first, block = written[node.input[1]]
            replacement = helper.make_node("MatMulNBits", [node.input[0], *first.input[1:]], list(node.output),
                                           name=node.name + "_Q4", domain="com.microsoft")
            replacement.attribute.extend(first.attribute)
        else:
            weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)  # (K, N): x @ W
            k, n = weight.shape
            rounded, bf16 = int4_rounding(k, group)
            codes, scales = symmetric_int4(torch.from_numpy(np.ascontiguousarray(weight.T)), rounded, bf16)
            per_row = codes.shape[1] == 1
            # per channel: any block holds the row's scale, so the one MLAS runs fastest
            block = channel_block(k, block_cost) if per_row else rounded
            count = -(-k // block)
            flat = codes.reshape(n, -1)[:, :k].numpy().astype(np.int16) + 8  # codes 0..15, zero at 8
            stored = np.full((n, count * block), 8, np.uint8)
            stored[:, :k] = flat
            pairs = stored.reshape(n, count, block // 2, 2)
            packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)  # low nibble first
            row_scales = scales.reshape(n, -1).numpy().astype(np.float32)
            row_scales = np.repeat(row_scales, count, axis=1) if per_row else row_scales[:, :count]
            names = [f"{node.input[1]}_Q4", f"{node.input[1]}_scales"]
            graph.initializer.append(numpy_helper.from_array(packed, names[0]))
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(row_scales).reshape(-1), names[1]))
            replacement = helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), name=node.name + "_Q4",
                                           domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                                           accuracy_level=accuracy_level)
            written[node.input[1]] = replacement, block
            if readers[node.input[1]] == sharing[node.input[1]]:  # no other reader keeps the float weight
                graph.initializer.remove(initializers[node.input[1]])
        at = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(at, replacement)
        blocks[node.name] = block
    return blocks


def _fold_biases(graph) -> int:
    """A bias Add right after a MatMulNBits becomes the node's own ``bias`` input (its sixth); at decode
    a separate Add costs more in dispatch than its additions. Returns how many were folded."""
    initializers = {i.name: tuple(i.dims) for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producers = {o: n for n in graph.node if n.op_type == "MatMulNBits" for o in n.output}
    folded = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        for i, j in ((0, 1), (1, 0)):
            matmul, bias = producers.get(add.input[i]), add.input[j]
            if matmul is None or consumers[add.input[i]] != 1 or add.input[i] in outputs or len(matmul.input) > 5:
                continue
            width = next(a.i for a in matmul.attribute if a.name == "N")
            if initializers.get(bias) != (width,):
                continue
            matmul.input.extend([""] * (5 - len(matmul.input)) + [bias])
            matmul.output[0] = add.output[0]
            folded.append(add)
            break
    for add in folded:
        graph.node.remove(add)
    return len(folded)


def _half_scales(graph, exact: bool = False) -> int:
    """Store every block-scale tensor of the 4- and 8-bit nodes as fp16 behind one ``Cast`` to fp32;
    returns how many were. The operators take scales of the activations' type (fp32 here), and a
    Cast of a constant is folded back into an fp32 initializer by onnxruntime's constant folding when
    the session is made, before the kernels prepack their weights, so decoding is unchanged; the
    file loses 2 bytes per block (a quarter of the 4-bit nodes' overhead beside their codes). A
    tensor whose nonzero scales fp16 cannot hold (outside 6e-8..65504) stays fp32; with ``exact``,
    so does a symmetric node's (no zero points: the healed numerics' float32 scales) that fp16 would
    round at all."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    names = {n.input[2] for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized") and len(n.input) > 2}
    exact_names = {n.input[2] for n in graph.node if exact and n.op_type == "MatMulNBits"
                   and not (len(n.input) > 3 and n.input[3])}
    casts = []
    for init in list(graph.initializer):
        if init.name not in names or init.data_type != TensorProto.FLOAT:
            continue
        scales = numpy_helper.to_array(init)
        half = scales.astype(np.float16)
        with np.errstate(divide="ignore", invalid="ignore"):
            held = np.isfinite(half).all() and not ((half == 0) & (scales != 0)).any()
        held = held and (init.name not in exact_names or bool((half.astype(np.float32) == scales).all()))
        if not held:
            continue
        stored = init.name + "_fp16"
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(half, stored))
        casts.append(helper.make_node("Cast", [stored], [init.name], name=init.name + "/cast", to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)  # the Casts first: the graph stays in topological order
    del graph.node[:]
    graph.node.extend(nodes)
    return len(casts)


def quantize_int4(src: Path, dst: Path, group_size: int, symmetric: bool = SYMMETRIC,
                  accuracy_level: int = ACCURACY_LEVEL, embedding_4bit: bool = True, head_bits: int = 8,
                  fp16_scales: bool = FP16_SCALES, fuse_inputs: bool = True, healed_group: int | None = None,
                  block_cost: int = BLOCK_COST, reround: Callable[[Any], Any] | None = None) -> Int4Summary:
    """Write ``dst``: the fp32 graph ``src`` with 4-bit factors and embedding and a ``head_bits`` head (the
    keyword arguments are the alternatives measured above). ``healed_group``: the decoder's MatMuls
    hold the export's own symmetric int4 in that group (``PER_CHANNEL`` included), the weights a
    checkpoint healed through them was trained for, instead of onnxruntime's asymmetric blocks.
    ``reround``: given the finished graph, picks the decoder's codes again at its blocks and returns
    what it did (GPTQ: export/onnx_int4_gptq.py's ``gptq_round_graph``, a ``GptqResult``)."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Its INFO lines name every node, and its opset-21 warning is expected (see above).
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    model = onnx.load(str(src))  # with its external data, if any
    graph = model.graph
    head = _head_node(graph)
    if head is None:
        raise RankdownError(f"{src}: no MatMul writes {LOGITS!r}; cannot tell the head from the decoder linears")
    tied_table = head.input[1]
    tied_lookup = _tied_lookup(graph, tied_table)  # the fused graph: the lookup reads the head's weight
    tied = tied_lookup is None and _untie_head(graph, head)
    constants = {init.name: tuple(init.dims) for init in graph.initializer}
    weighted = [n for n in graph.node if n.op_type == "MatMul" and len(constants.get(n.input[1], ())) == 2]
    heads = [head] + _factored_head_down(head, weighted)
    keep_float = _lookup_projection(tied_lookup, weighted)
    decoder = [n for n in weighted if all(n is not h for h in heads + keep_float)]
    # Each decoder MatMul in the block ExecuTorch gives its input width (and healing trained through,
    # rankdown/int4_numerics.py): at group 128 a 576-wide input is 9 blocks of 64, not 5 of 128 with
    # the last zero-padded. A width no allowed block divides keeps ``group_size``, its last block padded.
    blocks = {n.name: group_for(constants[n.input[1]][0], group_size) or group_size for n in decoder}
    if len(blocks) != len(decoder) or not all(blocks):  # the passes below tell the nodes apart by name
        raise RankdownError(f"{src}: the decoder's MatMuls have no unique names; cannot give each its block")
    partial = sum(constants[n.input[1]][0] % blocks[n.name] != 0 for n in decoder)
    if healed_group is not None:
        # The decoder is written here, in the numerics it was healed through; no quantizer pass for it.
        blocks = _healed_matmul_nbits(graph, decoder, healed_group, accuracy_level, block_cost)
        partial = sum(constants[n.input[1]][0] % blocks[n.name] != 0 for n in decoder)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    quantizer_blocks = {} if healed_group is not None else blocks
    head_names = [n.name for n in heads]
    if not all(head_names) or any(n.name in head_names for n in weighted if all(n is not h for h in heads)):
        raise RankdownError(f"{src}: the head's MatMul has no unique name; cannot quantize it apart")
    float_names = [n.name for n in keep_float]
    others = [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in head_names]

    # 4 bits for every MatMul with a constant weight but the head (one pass per block size), then
    # ``head_bits`` for the head.
    for block in sorted(set(quantizer_blocks.values()), reverse=True):
        elsewhere = [name for name, b in quantizer_blocks.items() if b != block]
        four = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=symmetric,
                                    accuracy_level=accuracy_level, nodes_to_exclude=head_names + float_names + elsewhere,
                                    op_types_to_quantize=("MatMul",))
        four.process()
        model = four.model.model
    eight = MatMulNBitsQuantizer(model, bits=head_bits, block_size=group_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=others,
                                 op_types_to_quantize=("MatMul",))
    eight.process()
    quantized = eight.model
    if tied_lookup is not None:
        graph = quantized.model.graph
        head = next(n for n in graph.node if LOGITS in n.output)
        _lookup_from_quantized_head(graph, head, tied_table, *tied_lookup, group_size, head_bits)
    if embedding_4bit:
        # Only the token lookup: a Gather from a 2-D table (others read shapes, not weights).
        tables = {i.name for i in quantized.model.graph.initializer if len(i.dims) == 2}
        not_lookups = [n.name for n in quantized.model.graph.node if n.op_type == "Gather" and n.input[0] not in tables]
        gather = MatMulNBitsQuantizer(quantized.model, bits=4, block_size=group_size, is_symmetric=symmetric,
                                      nodes_to_exclude=not_lookups, op_types_to_quantize=("Gather",),
                                      quant_axes=(("Gather", 1),))
        with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block (a padding row): scale 0, handled
            gather.process()
        quantized = gather.model
    biases = _fold_biases(quantized.model.graph)
    # After the biases are folded: a first stage's own bias (attention_bias) is stacked with its rows.
    fused_input_linears = fuse_shared_inputs(quantized.model.graph) if fuse_inputs else 0
    half_scales = _half_scales(quantized.model.graph, exact=healed_group is not None) if fp16_scales else 0
    # last: the codes are chosen at the scales as stored (fp16), the ones the kernels run
    gptq = None
    if reround is not None:
        from rankdown.export.int4_gptq import gptq_record

        gptq = gptq_record(reround(quantized.model.graph))
    left = [n.name for n in quantized.model.graph.node if n.op_type == "MatMul" and n.name not in float_names
            and n.input[1] in {i.name for i in quantized.model.graph.initializer}]
    if left:
        raise RankdownError(f"{src}: {len(left)} MatMul(s) with a constant weight were left in fp32 ({left[0]})")
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = sum(len(i.raw_data) for i in quantized.model.graph.initializer) > 1_800_000_000
    quantized.save_model_to_file(str(dst), use_external_data_format=large)
    lookups = [n for n in quantized.model.graph.node if n.op_type == "GatherBlockQuantized"]
    if tied_lookup is not None:
        embedding = f"GatherBlockQuantized {head_bits}-bit, the head's weight (the tied table stored once)" + (
            ", then its fp32 projection" if keep_float else "")
    else:
        embedding = "GatherBlockQuantized 4-bit" if embedding_4bit and lookups else "fp32 Gather"
    return Int4Summary(int4_matmuls=len(decoder), fused_input_linears=fused_input_linears, folded_biases=biases,
                       partial_blocks=int(partial),
                       head=(f"MatMulNBits {head_bits}-bit" + (" (own copy of the tied table)" if tied else "")
                             + (", a factor pair" if len(heads) > 1 else "")),
                       embedding=embedding,
                       block_size=group_size, block_sizes=dict(sorted(Counter(blocks.values()).items())),
                       symmetric=symmetric or healed_group is not None, accuracy_level=accuracy_level,
                       scheme=(QUANTIZER if healed_group is None else
                               f"symmetric absmax int4 {group_label(healed_group)} "
                               "(max |w| / 7.5, the numerics --heal-quantize trains through)"),
                       scales=(f"fp16, cast to fp32 once at load ({half_scales} tensors)" if half_scales else "fp32"),
                       gptq=gptq)
