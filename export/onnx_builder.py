"""The fused ONNX graph: onnxruntime-genai's own model builder, fed rankdown's loaded model.

The builder (``onnxruntime_genai.models.builder``, the peers' exporter) writes the graph
onnxruntime runs fastest on CPU: ``com.microsoft::GroupQueryAttention`` with the KV cache and the
rotary embedding inside the op (cos/sin caches as initializers), ``SkipSimplifiedLayerNormalization``
for every RMSNorm + residual, a tied head read through one Transpose, and ``genai_config.json``.
``RankdownLlamaModel`` subclasses its ``LlamaModel`` and changes these things:

- ``load_weights`` returns the model the export already holds (no hub load);
- ``make_matmul`` emits a factor pair as two MatMuls, ``down`` then ``up``, named
  ``/<module>/<down|up>/MatMul`` so export/factor_nodes.py finds them; a shared ``down``
  (``joint``) runs once per input;
- Q/K/V are not packed into one MatMul when any of them is a factor pair (a pair has no weight
  to concatenate); dense layers keep the builder's packing;
- a factored head (``compress --head-rank``) is the head's two MatMuls, and a factored tied
  table's lookup reads the head's ``up`` through a Transpose, then its ``proj`` MatMul;
- a bias on o_proj or down_proj (``feature``'s ``up`` carries one) is not an Add node: it becomes
  the ``bias`` input of the SkipSimplifiedLayerNormalization that adds that output to the residual
  (the op computes input + skip + bias, and its output 3, the next residual, includes it). At
  decode a node costs more in dispatch than its 576 additions.

The builder targets transformers 5.2x; the project is pinned to 4.57 (optimum-onnx needs < 4.58).
Two shims make it run on 4.57, both without touching the library (see ``_import_builder`` and
``make_config_init``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path
from typing import Any

from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear, SharedDownLinear
from rankdown.factor_record import HEAD, factored_table

GRAPH_FILE = "model.onnx"
# The builder's names for the bias Adds whose sums go straight into the residual stream.
_RESIDUAL_BIAS_ADDS = ("/attn/o_proj/Add", "/mlp/down_proj/Add")
# transformers classes the builder imports at module level (builders/base.py) and that 4.57
# lacks. The builder only uses them for model types rankdown never builds (vision, MoE).
_MISSING_IN_TRANSFORMERS_457 = (
    "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration", "Lfm2VlForConditionalGeneration",
    "Qwen3VLForConditionalGeneration", "Mistral3ForConditionalGeneration", "Gemma3ForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)


def _import_builder() -> Any:
    """The builder's ``LlamaModel``. Shim 1: a placeholder class on ``transformers`` for each name
    the builder imports that this transformers lacks (only the missing ones), before the import.
    ``onnxruntime_genai.models`` puts its folder on sys.path and imports ``builders`` as a
    top-level package, so the class comes from ``builders.llama``."""
    import importlib

    import transformers

    for name in _MISSING_IN_TRANSFORMERS_457:
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (), {}))
    importlib.import_module("onnxruntime_genai.models.builder")
    return importlib.import_module("builders.llama").LlamaModel


class _Weight:
    """What the builder's ``make_matmul_op`` reads from a linear: ``.weight`` (out x in), ``.bias``."""

    def __init__(self, linear):
        self.weight = linear.weight.detach()
        self.bias = None  # a pair's bias is up's, and the builder adds it from the pair's ``bias``


def _factor_class(base: Any) -> Any:
    class RankdownLlamaModel(base):
        """The builder's Llama, taught rankdown's factor pairs (module docstring)."""

        def __init__(self, model, io_dtype, onnx_dtype, cache_dir: str, extra_options: dict):
            self._source_model = model
            self._names = {id(m): n for n, m in model.named_modules()}
            self._shared_downs: dict[tuple[int, str], str] = {}
            self._residual_biases: dict[str, tuple[str, str]] = {}  # Add output it replaces -> (its input, bias)
            self._norm_bias: str | None = None
            super().__init__(copy.deepcopy(model.config), io_dtype, onnx_dtype, "cpu", cache_dir, extra_options)

        def make_config_init(self, config):
            """Shim 2: transformers 4.57 keeps ``rope_theta`` at the top level and ``rope_scaling`` None;
            the builder reads 5.x's ``rope_parameters`` dict. On the builder's own copy of the config."""
            if getattr(config, "rope_scaling", None) is None:
                config.rope_scaling = {}
            if not isinstance(getattr(config, "rope_parameters", None), dict):
                config.rope_parameters = {"rope_type": config.rope_scaling.get("rope_type", "default"),
                                          "rope_theta": config.rope_theta}
            if not config.architectures:  # an imported GGUF's config names none
                config.architectures = ["LlamaForCausalLM"]
            super().make_config_init(config)

        def load_weights(self, input_path):
            return self._source_model

        def has_lm_head(self, module):
            # The builder takes any linear with vocabulary-many outputs for the head: a factored head's
            # ``up`` would be built a second time, from the final norm.
            return module is self._source_model.get_submodule(HEAD)

        def make_embedding_lookup(self, embedding, basename, lm_head):
            """A factored tied table: the lookup reads the head's ``up`` (B^T, stored once) through a
            Transpose, as the builder reads a dense tied head, then ``proj`` (A^T) as a MatMul."""
            table = factored_table(self._source_model)
            if table is None:
                return super().make_embedding_lookup(embedding, basename, lm_head)
            transpose = f"{basename}/Transpose"
            self.make_transpose(transpose, f"{HEAD}.up.MatMul.weight", self.io_dtype,
                                shape=[self.vocab_size, table.rank], perm=[1, 0])
            gather = f"{basename}/Gather"
            self.make_node("Gather", inputs=[f"{transpose}/output_0", self.input_names["input_ids"]],
                           outputs=[f"{gather}/output_0"], name=gather)
            self.make_value(f"{gather}/output_0", self.io_dtype, shape=self.make_hidden_state_shape(last_dim=table.rank))
            projected = super().make_matmul(_Weight(table.proj), f"{basename}/proj/MatMul", f"{gather}/output_0")
            return f"{projected}/output_0"

        def make_attention(self, layer_id, attention, root_input, **kwargs):
            # The builder sets k_path / v_path only where it does not pack Q/K/V, and never clears
            # them: a packed (all dense) layer after an unpacked one fed the earlier layer's keys and
            # values to its GroupQueryAttention beside the packed input (error ranks leave such layers).
            self.attention_attrs["k_path"] = self.attention_attrs["v_path"] = ""
            return super().make_attention(layer_id, attention, root_input, **kwargs)

        def is_qkv_projection_packable(self, layer_id, attention):
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            if any(isinstance(p, (FactorizedLinear, SharedDownLinear)) for p in projections):
                return False
            return super().is_qkv_projection_packable(layer_id, attention)

        def make_matmul(self, matmul, basename, root_input, **kwargs):
            if isinstance(matmul, FactorizedLinear):
                down = self._factor(matmul, "down", matmul.down, root_input)
            elif isinstance(matmul, SharedDownLinear):
                down = self._shared_down(matmul, root_input)
            else:
                return super().make_matmul(matmul, basename, root_input, **kwargs)
            up_name = f"/{self._names[id(matmul)]}/up/MatMul"
            return super().make_matmul(_Weight(matmul.up), up_name, f"{down}/output_0", **kwargs)

        def make_add_bias(self, add, name, root_input, **kwargs):
            if not name.endswith(_RESIDUAL_BIAS_ADDS):
                return super().make_add_bias(add, name, root_input, **kwargs)
            bias = name[1:].replace("/", ".") + ".bias"
            self.make_initializer(add, bias, to=self.io_dtype)
            self._residual_biases[f"{name}/output_0"] = (root_input, bias)

        def make_layernorm(self, layer_id, layernorm, skip, simple, location):
            folded = self._residual_biases.pop(self.layernorm_attrs["skip_input"], None) if skip else None
            if folded is not None:
                if not simple:
                    raise RankdownError("a residual bias can only be folded into SkipSimplifiedLayerNormalization")
                self.layernorm_attrs["skip_input"], self._norm_bias = folded
            super().make_layernorm(layer_id, layernorm, skip, simple, location)
            if self._norm_bias is not None:
                raise RankdownError(f"the builder made no SkipSimplifiedLayerNormalization for {self._norm_bias}")

        def make_layernorm_op(self, name, op_type, inputs, outputs, skip, new_io_dtype, **kwargs):
            if self._norm_bias is not None and op_type == "SkipSimplifiedLayerNormalization":
                inputs, self._norm_bias = [*inputs, self._norm_bias], None
            super().make_layernorm_op(name, op_type, inputs, outputs, skip, new_io_dtype, **kwargs)

        def _factor(self, pair, child: str, linear, root_input: str) -> str:
            # Named by the module (dots kept): export/factor_nodes.py locates ``model.layers.0.self_attn.q_proj.down``.
            return super().make_matmul(_Weight(linear), f"/{self._names[id(pair)]}/{child}/MatMul", root_input)

        def _shared_down(self, member, root_input: str) -> str:
            """A group's ``down`` runs once per input, under its owner's name."""
            key = (id(member.shared_down), root_input)
            if key not in self._shared_downs:
                owner = next(m for m in self._source_model.modules()
                             if isinstance(m, SharedDownLinear) and m.owns_down and m.down is member.shared_down)
                self._shared_downs[key] = self._factor(owner, "down", member.shared_down, root_input)
            return self._shared_downs[key]

    return RankdownLlamaModel


def build_fused_onnx(model, out: Path, generation_source: Path | None = None) -> str:
    """Write ``out/model.onnx`` (+ ``model.onnx.data``) and the builder's ``genai_config.json`` for
    ``model`` (a transformers Llama, dense or with factor pairs), fp32. ``generation_source``: the
    checkpoint folder the builder reads generation_config.json and the tokenizer's end-of-turn
    token from. Returns the builder's log (stdout and stderr), which it prints freely."""
    import onnx_ir as ir
    from transformers.utils import logging as transformers_logging

    base = _import_builder()
    config = model.config
    if getattr(config, "model_type", "llama") != "llama":
        raise RankdownError(f"the fused ONNX graph takes Llama models, not {config.model_type!r}; "
                            f"use --onnx-graph optimum")
    # A factored tied table is shared by make_embedding_lookup, not by the builder's own tying.
    tied = bool(config.tie_word_embeddings) and factored_table(model) is None
    extra = {"hf_token": False, "filename": GRAPH_FILE, "shared_embeddings": tied}
    log = io.StringIO()
    out.mkdir(parents=True, exist_ok=True)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its tokenizer probe (end-of-turn token) warns through transformers
    try:
        with tempfile.TemporaryDirectory(prefix="rankdown-builder-") as cache, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            builder = _factor_class(base)(model, ir.DataType.FLOAT, ir.DataType.FLOAT, cache, extra)
            if generation_source is not None:
                builder.model_name_or_path = str(generation_source)
            builder.make_model(str(generation_source or ""))
            if builder._residual_biases:  # an Add output no norm consumed: its bias would be lost
                raise RankdownError(f"fused ONNX graph: residual bias(es) not folded: {sorted(builder._residual_biases)}")
            builder.save_model(str(out))
            builder.make_genai_config(copy.deepcopy(config), {}, str(out))
    finally:
        transformers_logging.set_verbosity(verbosity)
    return log.getvalue()
