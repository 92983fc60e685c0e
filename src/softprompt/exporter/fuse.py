"""Optional graph fusion for onnxruntime (`export-model --fuse`).

The dynamo export spells every RMSNorm, rotary embedding and attention out in small ops (about
2,247 nodes for SmolLM2's 30 layers); at batch 1 on a CPU their dispatch costs a tenth of each
decode step. onnxscript's onnxruntime rewriter turns them into onnxruntime's contrib ops
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, RotaryEmbedding,
MultiHeadAttention). Measured on SmolLM2 (2 threads, quiet machine): 8-11% more decode tokens/s.

Deliberately left out: the GroupQueryAttention fusion (onnxscript's full `optimize_for_ort`).
That op reads sequence lengths instead of the attention mask, which breaks left-padded batches and
the runtime's cached prompts (masked columns between a prompt and a row's text): measured, the
last logits of such a batch moved by 0.79 of their scale. MultiHeadAttention keeps the mask.
The export's validation against PyTorch runs on the fused graph, padded rows included.

The passes are onnxscript's public ones, in the order its own `optimize_for_ort` runs them (shape
optimisation first, the pattern rules last), minus the GroupQueryAttention fusions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .graph import save_over


def fuse_for_onnxruntime(path: Path, external_data: bool) -> dict[str, int]:
    """Rewrite the graph at `path` in place; returns how many of each onnxruntime contrib op it now holds.

    Counted in the written graph, not as patterns matched: which fusions apply depends on how the
    installed transformers spells the model (with transformers 5 the rotary embedding of a traced
    Llama is left unfused, for one).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import (
        fused_matmul_rule_sets,
        instance_to_group_normalization,
        shape_optimization,
        softmax,
    )
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_partial_rotary_embedding, fuse_rotary_embedding
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )

    model = ir.load(str(path))
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    fuse_rms_normalization(model)
    fuse_skip_layer_normalization(model)
    fuse_skip_rms_normalization(model)
    fuse_rotary_embedding(model)
    fuse_cos_sin_cache(model)  # a rotary fusion whose cos/sin it cannot cache is inlined back by optimize()
    common_passes.CommonSubexpressionEliminationPass()(model)
    fuse_partial_rotary_embedding(model)
    fuse_sdpa(model, apply_shape_inference=True)
    replace_sdpa_by_mha(model)
    optimize(model)
    rewrite(
        model,
        [*softmax.rules.rules, *instance_to_group_normalization.rules.rules, *fused_matmul_rule_sets.fused_matmul_rule_sets()],
    )
    save_over(model, path, external_data)
    return dict(sorted(Counter(node.op_type for node in model.graph if node.domain == "com.microsoft").items()))
