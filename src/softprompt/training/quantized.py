"""Quantization-aware prompt training: the frozen model runs the weights its int8 or int4 export will run.

The backbone is frozen, so quantizing it for training costs nothing per step: each matrix product's
weight is replaced, once, by the values the exported MatMulNBits holds (`exporter.precision.dequantized`
runs the exporter's own quantizer and reads them back), and the input embeddings by the int8 table's
rows, which is what the runtime gathers. The prompt then learns against the device's weights and can
make up for their error. It stays float32 and carries the fp32 model's fingerprint, like any prompt:
it loads on every precision, and is best on the one it was trained for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from softprompt.exporter.precision import TABLE_PRECISION, Precision, default_precision, dequantized, for_kind
from softprompt.formats.embedding_table import ScaledRows, quantize_rows
from softprompt.formats.export_folder import read_config

from .errors import TrainingError

TRAINABLE_PRECISIONS = ("fp32", "int8", "int4")


def precision_of(spec: str, kind: str) -> Precision:
    """A precision name (export-model's defaults for it) or an export folder (the settings it was made with)."""
    folder = Path(spec)
    if (folder / "softprompt.json").is_file():
        config = read_config(folder)
        settings = {k: v for k, v in config.quantization.items() if k != "precision"}
        if "keep" in settings:
            settings["keep"] = tuple(settings["keep"])
        name = config.precision
        precision = Precision(name, **settings) if settings else default_precision(name)
    elif spec in TRAINABLE_PRECISIONS:
        name, precision = spec, default_precision(spec)
    else:
        raise TrainingError(f"--precision {spec!r}; expected one of {', '.join(TRAINABLE_PRECISIONS)} or an export folder")
    if name not in TRAINABLE_PRECISIONS:
        raise TrainingError(f"--precision {spec}: the export is {name}; prompts train through fp32, int8 or int4 weights")
    return for_kind(precision, kind)


def quantize_backbone(backbone, spec: str) -> dict:
    """Put into `backbone.model`, in place, the weights an export at `spec` runs (a precision name: export-model's
    defaults for it; an export folder: the settings it was made with); returns the precision's record."""
    precision = precision_of(spec, backbone.kind)
    name = precision.name
    if name == "fp32":
        return precision.record()
    if backbone.kind != "decoder":
        raise TrainingError(f"--precision {name} trains decoder prompts, not {backbone.kind} ones (train it at fp32)")
    from transformers.pytorch_utils import Conv1D

    model = backbone.model
    head = model.get_output_embeddings()
    products: dict[str, tuple[torch.nn.Module, bool]] = {}  # module name -> (module, stored as [out, in])
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            products[module_name] = (module, True)
        elif isinstance(module, Conv1D):
            products[module_name] = (module, False)
    lm_head = next((n for n, (m, _) in products.items() if m is head), None)
    weights = {
        n: (m.weight.detach().numpy().T if transposed else m.weight.detach().numpy()) for n, (m, transposed) in products.items()
    }
    values = dequantized(weights, precision, backbone.table, lm_head)
    with torch.no_grad():
        for module_name, (module, transposed) in products.items():
            value = values[module_name].T if transposed else values[module_name]
            module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(value)), requires_grad=False)
        codes, scales = quantize_rows(backbone.table, TABLE_PRECISION[name])
        rows = ScaledRows(codes, scales)[:]
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.from_numpy(rows), freeze=True))
    return precision.record()
