"""Export tiny random encoder-decoders of several families and compare greedy tokens with transformers.

Not a speed benchmark: a sweep of which encoder-decoder architectures the exporter and runtime
handle (make test covers T5, BART and Marian). For each: the runtime without a prompt against
`generate(input_ids=...)` (the model's own token path), and with a 4-vector prompt against
`generate(inputs_embeds=[prompt, token embeddings] x the encoder's input scale)`.

    python bench/seq2seq_architectures.py [NAME ...]
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_tokenizer  # noqa: E402

from softprompt.exporter.export import export_model
from softprompt.runtime import load
from softprompt.prompt_bank import save_prompt


def cfg(name: str):
    """A tiny random model of family `name` and its tokenizer's special-token template."""
    common = dict(vocab_size=320, pad_token_id=0, eos_token_id=2)
    if name == "t5-v1.1":
        return T.T5ForConditionalGeneration(T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, initializer_factor=3.0, **common)), "$A </s>"
    if name == "mt5":
        return T.MT5ForConditionalGeneration(T.MT5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0, initializer_factor=3.0, **common)), "$A </s>"
    if name == "mbart":
        return T.MBartForConditionalGeneration(T.MBartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, scale_embedding=True, init_std=0.2, bos_token_id=1, decoder_start_token_id=2, forced_eos_token_id=2, forced_bos_token_id=5, **common)), "<s> $A </s>"
    if name == "marian":
        return T.MarianMTModel(T.MarianConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, init_std=0.2, scale_embedding=True, decoder_start_token_id=0, forced_eos_token_id=2, **common)), "$A </s>"
    if name == "pegasus":
        return T.PegasusForConditionalGeneration(T.PegasusConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, init_std=0.2, scale_embedding=True, decoder_start_token_id=0, forced_eos_token_id=2, **common)), "$A </s>"
    if name == "blenderbot-small":
        return T.BlenderbotSmallForConditionalGeneration(T.BlenderbotSmallConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, init_std=0.2, scale_embedding=True, decoder_start_token_id=1, bos_token_id=1, forced_eos_token_id=2, **common)), "$A </s>"
    if name == "longt5":
        return T.LongT5ForConditionalGeneration(T.LongT5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0, initializer_factor=3.0, **common)), "$A </s>"
    raise KeyError(name)


TEXTS = ["a gorgeous, moving film", "dull and slow", "the quick brown fox jumps over"]
NAMES = ["t5-v1.1", "mt5", "longt5", "mbart", "marian", "pegasus", "blenderbot-small"]
failed = 0
for name in sys.argv[1:] or NAMES:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.time()
        torch.manual_seed(0)
        try:
            model, template = cfg(name)
            model.save_pretrained(d / "hf"); make_tokenizer(d / "hf", False, template)
            conf = export_model(str(d / "hf"), d / "exp", log=lambda m: None)
        except Exception as e:
            print(f"{name:16} export: {type(e).__name__}: {str(e)[:300]}")
            failed += 1
            continue
        ref = type(model).from_pretrained(d / "hf").eval()
        tok = T.AutoTokenizer.from_pretrained(d / "hf")
        prompt = (np.random.default_rng(0).standard_normal((4, conf.hidden_size)) * float(np.load(d/"exp"/"embeddings.npy").std())).astype(np.float32)
        save_prompt(d / "bank", "t", prompt, fingerprint=conf.fingerprint)
        rt = load(d / "exp", bank=d / "bank")
        got = [c.token_ids for c in rt.complete(TEXTS, task="t", max_new_tokens=8)]
        want = []
        for text in TEXTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            from softprompt.exporter.seq2seq import input_scales
            emb = torch.cat([torch.from_numpy(prompt)[None], ref.get_input_embeddings()(ids)], 1) * input_scales(ref)[0]
            with torch.no_grad():
                out = ref.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long), max_new_tokens=8, do_sample=False, num_beams=1)
            want.append(out[0, 1:].tolist())
        plain = [c.token_ids for c in rt.complete(TEXTS, max_new_tokens=8)]
        ids_path = []
        for text in TEXTS:
            b = tok(text, return_tensors="pt")
            with torch.no_grad():
                ids_path.append(ref.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=8, do_sample=False, num_beams=1)[0, 1:].tolist())
        from softprompt.exporter.seq2seq import input_scales
        failed += got != want or plain != ids_path
        print(f"{name:16} prompt {'ok' if got == want else 'MISMATCH'}  ids-path {'ok' if plain == ids_path else 'MISMATCH'}  scales {input_scales(ref)} ({time.time()-t0:.0f} s)")
sys.exit(1 if failed else 0)
