"""`export-model MODEL OUT_DIR`: export a frozen backbone once, with an `inputs_embeds` entry point."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from softprompt.formats import __version__
from softprompt.formats.command import Parser, run_command

EPILOG = """\
MODEL is one of:
  a built-in name     {builtins}
  a .gguf file        converted to float32 once and cached ($SOFTPROMPT_CACHE, else ~/.cache/softprompt-onnx)
  a model folder      a local Hugging Face folder (config.json, weights, tokenizer); nothing is downloaded

The kind of model is read from its config: a decoder-only LM (Llama, GPT-2, ...) gives model.onnx
with a KV cache; an encoder (BERT, MiniLM, ...) model.onnx to the last hidden state; an
encoder-decoder (T5, BART, ...) encoder.onnx and decoder.onnx, the prompt on the encoder input.
OUT_DIR also receives the embedding table (embeddings.npy; at int8 and int4 a tied lm_head is the
table, kept once in model.onnx.data), the tokenizer files and softprompt.json; a decoder also gets
model.genai.onnx and genai_config.json, itself in onnxruntime-genai's layout (run-model --loop genai).
Each graph keeps its weights beside it in .onnx.data (onnxruntime maps the file). The export is validated against
PyTorch before OUT_DIR is written; on failure every mismatch is listed and OUT_DIR is left as it was.

examples:
  export-model smollm2-135m exports/smollm2
  export-model smollm2-135m exports/smollm2-int8 --precision int8
  export-model path/to/model.gguf exports/model-gguf --precision gguf   # the file's own quantization
  export-model minilm-l6 exports/minilm
  export-model path/to/t5-folder exports/t5
"""


def build_parser() -> argparse.ArgumentParser:
    from softprompt.formats.export_folder import PRECISIONS

    from .precision import ALGORITHMS
    from .sources import BUILTINS

    builtins = ", ".join(f"{name} ({b.description})" for name, b in BUILTINS.items())
    parser = Parser(
        prog="export-model",
        description="Export a frozen decoder, encoder or encoder-decoder to ONNX (inputs_embeds entry point) "
        "for soft-prompt serving.",
        epilog=EPILOG.format(builtins=builtins),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "model", metavar="MODEL", help="built-in name, .gguf file, Hugging Face model folder, or an export folder (its source)"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write the export into")
    parser.add_argument(
        "--opset",
        type=int,
        default=18,
        help="ONNX opset of traced graphs (default: 18; built graphs use 23, the first with Attention)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed max|onnx - torch fp32| / max|torch fp32| for logits and cache in validation "
        "(default: fp32 1e-4; a decoder converted to fp16/int8/int4 is judged instead by its next-token KL to fp32 "
        "and perplexity on sample text, refused only when broken; encoders and encoder-decoders: fp16 0.05, "
        "int8 0.25, int4 0.25)",
    )
    precision = parser.add_argument_group(
        "precision",
        "int8 and int4 quantize the weights of every constant matrix product (lm_head included) to onnxruntime's "
        "MatMulNBits: the CPU choice, 2-3x faster than fp32 and 3.5-5x smaller (encoders at int8 quantize activations "
        "too: --algorithm dynamic). gguf (a .gguf model only) keeps the file's own quantization: each weight stored as "
        "its blocks are, 4-bit types at 4 bits, 5- to 8-bit types at 8, every value as llama.cpp reads it. fp16 is for "
        "CUDA. The embedding table is stored at int8 (fp16 for fp16) and read back as float32; activations, the KV cache "
        "and every prompt stay float32: prompts trained on one precision load on all.",
    )
    precision.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weights of the graphs (default: fp32)")
    precision.add_argument("--block-size", type=int, default=None, help="int8/int4: weights per scale (default: 32)")
    precision.add_argument("--symmetric", action="store_true", default=None, help="int8/int4: no zero points")
    precision.add_argument(
        "--accuracy-level",
        type=int,
        choices=range(5),
        default=None,
        help="int8/int4/gguf: MatMulNBits compute type (default: 4, int8 activations, for decoders and encoder-decoders; "
        "0, float, for encoders, which run whole batches)",
    )
    precision.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=None,
        help="int8/int4: rtn (round to nearest; the default for int8 decoders), offset (int4: a float minimum per "
        "block; int4's default), hqq (int4, float zero points: onnxruntime's CPU kernels run it slowly) or dynamic "
        "(int8: activations quantized at run time too, MatMulInteger; the default for int8 encoders, with the "
        "products that move the output most, measured on sample text, kept at fp32 unless --keep names them)",
    )
    precision.add_argument(
        "--fast",
        action="store_true",
        help="int4: onnxruntime-genai's recipe instead of the default (--algorithm rtn --symmetric, lm_head at 4 bits "
        "too): the fastest and smallest int4, but it changes the model's top token far more often (docs/QUALITY.md)",
    )
    precision.add_argument(
        "--web",
        action="store_true",
        help="int8/int4 for web pages: the quantized weights as DequantizeLinear + MatMul, which onnxruntime-web folds "
        "into float weights when the page loads (int4's download at fp32's decode speed: 55 against 4 tokens/s in "
        "WebAssembly); the Python runtime folds them too, so on devices export without it",
    )
    precision.add_argument(
        "--keep",
        action="append",
        default=None,
        metavar="NAME[=fp32|int8]",
        help="int8/int4: weights (names or their beginnings; lm_head: the logits' projection) to keep at fp32, or at "
        "int8 in an int4 export; repeatable (default for int4: lm_head=int8)",
    )
    parser.add_argument(
        "--attention",
        choices=["sdpa", "eager"],
        default=None,
        help="attention implementation to trace (default: transformers' choice for the model)",
    )
    parser.add_argument(
        "--graph",
        choices=["auto", "built", "traced"],
        default="auto",
        help="how a decoder's graph is made: built op by op with onnxruntime's fused ops (Llama, Mistral, "
        "Qwen2: about 1.25x faster decoding), traced through PyTorch (any architecture), or auto "
        "(built where supported and it validates, else traced; the default)",
    )
    parser.add_argument(
        "--kv-cache",
        choices=["shared", "growing"],
        default=None,
        help="built decoder graphs: 'shared' (GroupQueryAttention: the runtime keeps the cache in one buffer that each "
        "step writes in place; 1.03-1.17x faster decoding on CPUs) or 'growing' (ONNX's Attention: each step copies "
        "the cache into a new one). onnxruntime's CUDA provider has GroupQueryAttention for fp16 only, so choose "
        "'growing' to run an fp32/int8/int4 export on CUDA (default: growing for fp16, else shared)",
    )
    parser.add_argument(
        "--fuse",
        action="store_true",
        help="for traced graphs: fuse normalisation, rotary embeddings and attention into onnxruntime contrib ops "
        "(8-11%% faster decoding in a quiet A/B run on 2 cores)",
    )
    parser.add_argument(
        "--task",
        choices=["auto", "decoder", "encoder", "seq2seq"],
        default="auto",
        help="what to export the model as (default: auto, from its config); e.g. --task encoder "
        "for an embedding model of a type not known as an encoder",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="where converted GGUF models are cached")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quantization = {
        "--block-size": args.block_size,
        "--symmetric": args.symmetric,
        "--accuracy-level": args.accuracy_level,
        "--algorithm": args.algorithm,
        "--keep": args.keep,
    }
    if args.tolerance is not None and not 0 < args.tolerance < float("inf"):  # (NaN fails it too)
        parser.error(f"--tolerance {args.tolerance}; expected a positive number")
    if not 7 <= args.opset <= 23:
        parser.error(f"--opset {args.opset}; expected 7 to 23 (the ONNX opsets torch.onnx writes)")
    if args.block_size is not None and (args.block_size < 16 or args.block_size & (args.block_size - 1)):
        parser.error(f"--block-size {args.block_size}; expected a power of two, at least 16")
    given = [flag for flag, value in quantization.items() if value is not None]
    if args.precision == "gguf":  # the file's blocks are kept; only the compute type is a choice
        given = [flag for flag in given if flag != "--accuracy-level"]
    if given and args.precision not in ("int8", "int4"):
        parser.error(f"{', '.join(given)} set(s) how int8/int4 weights are quantized; add --precision int8 or int4")
    if args.fast and args.precision != "int4":
        parser.error("--fast is a recipe for int4; add --precision int4")
    if args.web and args.precision not in ("int8", "int4"):
        parser.error("--web stores quantized weights for web pages; add --precision int8 or int4")
    recipe = [flag for flag in ("--symmetric", "--algorithm", "--keep") if quantization[flag] is not None]
    if args.fast and recipe:
        parser.error(f"--fast sets {', '.join(recipe)} itself (--algorithm rtn --symmetric, no --keep); give one or the other")
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        from .export import export_model
        from .precision import FAST_INT4, default_precision
    except ImportError as exc:
        print(
            f"error: export needs torch and transformers ({exc.name} is missing): pip install 'softprompt-onnx[export]'",
            file=sys.stderr,
        )
        return 1
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    chosen = {
        "block_size": args.block_size,
        "symmetric": args.symmetric,
        "accuracy_level": args.accuracy_level,
        "algorithm": args.algorithm,
        "keep": tuple(args.keep) if args.keep is not None else None,
        "web": args.web or None,
        **(FAST_INT4 if args.fast else {}),
    }

    def export() -> int:
        config = export_model(
            args.model,
            args.out_dir,
            opset=args.opset,
            tolerance=args.tolerance,
            precision=default_precision(args.precision, **chosen),
            overwrite=args.force,
            attention=args.attention,
            fuse=args.fuse,
            cache_dir=args.cache_dir,
            kind=None if args.task == "auto" else args.task,
            graph=args.graph,
            kv_cache=args.kv_cache,
            log=log,
        )
        log(
            f"exported {config.architecture} ({config.num_layers} layers, width {config.hidden_size}, "
            f"vocab {config.vocab_size}) to {args.out_dir}"
        )
        print(args.out_dir)
        return 0

    return run_command(export, interrupted="interrupted; OUT_DIR was left as it was")


if __name__ == "__main__":
    sys.exit(main())
