"""A GGUF's own tokenizer (exporter/gguf_tokenizer.py) tokenizes as llama.cpp does with the file.

Tiny GGUF files written here, one per tokenizer kind, and references written from llama.cpp's
algorithms (llama-vocab.cpp: the SPM session's highest-score merges with byte fallback, the BPE
session's regex splits and ranked merges, special tokens partitioned out first), compared on
generated texts. The real models' files are compared with llama.cpp itself in
bench/quality/gguf_tokenizer.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from softprompt.exporter.gguf_tokenizer import PRE_TOKENIZERS, gguf_fields, gguf_tokenizer, spm_merges

NORMAL, CONTROL, USER_DEFINED, BYTE = (
    int(t) for t in (gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.BYTE)
)


def write_gguf(path, kind: str, tokens, types, **extra):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if "scores" in extra:
        writer.add_token_scores(extra.pop("scores"))
    if "merges" in extra:
        writer.add_token_merges(extra.pop("merges"))
    if "pre" in extra:
        writer.add_tokenizer_pre(extra.pop("pre"))
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- llama.cpp's algorithms, written from llama-vocab.cpp -------------------------------------


def partition(text: str, specials: list[str]) -> list[tuple[bool, str]]:
    """tokenizer_st_partition: each special token, longest first, cut out of the raw fragments left to right."""
    fragments = [(False, text)]
    for special in sorted(specials, key=len, reverse=True):
        out = []
        for is_special, piece in fragments:
            if is_special:
                out.append((True, piece))
                continue
            parts = piece.split(special)
            for i, part in enumerate(parts):
                if part:
                    out.append((False, part))
                if i < len(parts) - 1:
                    out.append((True, special))
        fragments = out
    return fragments


def llama_cpp_spm(text, tokens, scores, types, add_space_prefix: bool, bos: int | None) -> list[int]:
    ids = {}
    for i, token in enumerate(tokens):
        ids.setdefault(token, i)
    specials = [t for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)]
    out = [] if bos is None else [bos]
    previous_special = True
    for is_special, piece in partition(text, specials):
        if is_special:
            out.append(ids[piece])
            previous_special = True
            continue
        piece = ((" " if add_space_prefix and previous_special else "") + piece).replace(" ", "▁")
        previous_special = False
        symbols = list(piece)
        while True:
            best = None
            for i in range(len(symbols) - 1):
                joined = symbols[i] + symbols[i + 1]
                if joined in ids and (best is None or scores[ids[joined]] > best[0]):
                    best = (scores[ids[joined]], i)
            if best is None:
                break
            i = best[1]
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        for symbol in symbols:
            if symbol in ids:
                out.append(ids[symbol])
            else:
                out += [ids[f"<0x{byte:02X}>"] for byte in symbol.encode()]
    return out


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def llama_cpp_bpe(text, tokens, merges, types, regexes, ignore_merges: bool) -> list[int]:
    ids = {}
    for i, token in enumerate(tokens):
        ids.setdefault(token, i)
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    alphabet = byte_level_alphabet()
    specials = [t for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)]
    out = []
    for is_special, piece in partition(text, specials):
        if is_special:
            out.append(ids[piece])
            continue
        words = [piece]
        for expression in regexes:  # each regex splits the pieces the ones before it left, keeping what it skips
            pattern = regex.compile(expression)
            split = []
            for word in words:
                start = 0
                for match in pattern.finditer(word):
                    if match.start() > start:
                        split.append(word[start : match.start()])
                    if match.end() > match.start():
                        split.append(match.group())
                    start = match.end()
                if start < len(word):
                    split.append(word[start:])
            words = split
        for word in words:
            word = "".join(alphabet[b] for b in word.encode())
            if ignore_merges and word in ids:
                out.append(ids[word])
                continue
            symbols = list(word)
            while True:
                pairs = [(ranks.get((symbols[i], symbols[i + 1])), i) for i in range(len(symbols) - 1)]
                pairs = [(rank, i) for rank, i in pairs if rank is not None]
                if not pairs:
                    break
                _, i = min(pairs)
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
            out += [ids[symbol] for symbol in symbols]
    return out


# ---- vocabularies --------------------------------------------------------------------------------

SPM_CHARS = list("▁abcdeé\n")  # "z", "ü" and "€" are left out: they fall back to bytes


def spm_vocab(seed: int):
    """Control and user-defined tokens, byte tokens, characters, and random joins of them with random scores."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", "<ctl>", "[user]"]
    types = [CONTROL, CONTROL, CONTROL, CONTROL, USER_DEFINED]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    words = set()
    while len(words) < 60:
        words.add("".join(rng.choice(SPM_CHARS, size=int(rng.integers(2, 6)))))
    for token in [*SPM_CHARS, *sorted(words)]:
        tokens.append(token)
        types.append(NORMAL)
    scores = [-1000.0] * 5 + [0.0] * 256 + list(rng.permutation(len(tokens) - 261).astype(float) * -1.0)
    return tokens, types, scores


@pytest.fixture(scope="module", params=[(0, False), (1, True), (2, False)])
def spm(request, tmp_path_factory):
    seed, prefix = request.param
    tokens, types, scores = spm_vocab(seed)
    path = write_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf",
        "llama",
        tokens,
        types,
        scores=scores,
        add_space_prefix=prefix,
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        add_bos_token=True,
    )
    tokenizer, why = gguf_tokenizer(gguf_fields(path))
    assert why is None
    return tokenizer, tokens, types, scores, prefix


SPM_TEXT = st.lists(st.sampled_from([*"abcdeé zü€\n", " ", "  ", "<ctl>", "[user]", "</s>"]), max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=SPM_TEXT)
def test_sentencepiece_bpe_tokenizes_as_llama_cpp(spm, text):
    tokenizer, tokens, types, scores, prefix = spm
    assert tokenizer.encode(text).ids == llama_cpp_spm(text, tokens, scores, types, prefix, bos=1)


def test_sentencepiece_bpe_round_trips_and_falls_back_to_bytes(spm):
    tokenizer, tokens, *_ = spm
    text = "abc zü€ dé"  # (with add_space_prefix, a space follows every special token, as in llama.cpp)
    ids = tokenizer.encode(text).ids
    assert tokens.index("<0xE2>") in ids  # "€" is not in the vocabulary: its three bytes
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokens[ids[0]] == "<s>"  # the file's add_bos_token


def test_spm_merges_rank_the_joined_token_by_its_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0, 0, 0, -5.0, -1.0, -3.0]  # bc first, then abc (from a+bc or ab+c), then ab
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]


def trained_byte_level(vocab_size: int = 300):
    """A byte-level BPE trained on a little text: its vocabulary and merges, as a GGUF stores them."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from conftest import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*CORPUS, "In 2024, 12345 cats; it's 99.5%!", "def f(x):\n    return x  # ok"], trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    # Merges across the places where pre-tokenizers differ (digits in ones or threes, a space before digits, "'S",
    # runs of spaces and newlines, punctuation), so that a wrong regex gives other tokens.
    for merge in [
        "Ġ 1",
        "Ġ 2",
        "Ġ1 2",
        "1 2",
        "12 3",
        "123 4",
        "2 0",
        "20 2",
        "202 4",
        "' S",
        "' s",
        "Ġ Ġ",
        "ĠĠ Ġ",
        "! !",
        "Ċ Ċ",
        "Ġ Ċ",
        "; Ġ",
        "% !",
        ", Ġ",
    ]:
        left, right = merge.split(" ")
        if merge not in merges and left in tokens and right in tokens:
            merges.append(merge)
            if left + right not in tokens:
                tokens.append(left + right)
    return [*tokens, "<|end|>", "<tool>"], merges, [NORMAL] * len(tokens) + [CONTROL, USER_DEFINED]


BPE_TEXT = st.lists(
    st.sampled_from(
        [
            "the",
            " film",
            "In",
            " 2024",
            "12345",
            ",",
            "'s",
            "'S",
            "!",
            " ",
            "  ",
            "\n",
            "\t",
            "é",
            "ü",
            "<|end|>",
            "<tool>",
            "x",
            "(",
            ")",
        ]
    ),
    max_size=25,
).map("".join)


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "smollm", "gpt-2", "default"])
def test_byte_level_bpe_tokenizes_as_llama_cpp_for_each_pre_tokenizer(pre, tmp_path):
    tokens, merges, types = trained_byte_level()
    path = write_gguf(tmp_path / "bpe.gguf", "gpt2", tokens, types, merges=merges, pre=pre, eos_token_id=len(tokens) - 2)
    tokenizer, why = gguf_tokenizer(gguf_fields(path))
    assert why is None
    regexes, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    assert not add_bos or tokenizer.encode("x").ids[0] is not None

    @settings(max_examples=150, deadline=None)
    @given(text=BPE_TEXT)
    def same(text):
        got = tokenizer.encode(text, add_special_tokens=False).ids
        assert got == llama_cpp_bpe(text, tokens, merges, types, regexes, ignore_merges)
        assert tokenizer.decode(got, skip_special_tokens=False) == text

    same()


def test_what_cannot_be_known_is_said(tmp_path):
    tokens, merges, types = trained_byte_level()
    unknown = write_gguf(tmp_path / "pre.gguf", "gpt2", tokens, types, merges=merges, pre="somebody-new")
    assert gguf_tokenizer(gguf_fields(unknown)) == (
        None,
        "its pre-tokenizer 'somebody-new' (tokenizer.ggml.pre) is not one this exporter knows",
    )
    ugm = write_gguf(tmp_path / "t5.gguf", "t5", tokens, types, scores=[0.0] * len(tokens))
    assert gguf_tokenizer(gguf_fields(ugm))[1] == "its tokenizer kind 't5' (tokenizer.ggml.model) is not one this exporter builds"
    scoreless = write_gguf(tmp_path / "spm.gguf", "llama", tokens, types)
    assert gguf_tokenizer(gguf_fields(scoreless))[1] == "a SentencePiece vocabulary without a score for each token"


def test_a_pre_tokenizer_table_entry_is_one_llama_cpp_has():
    """Every name maps to regexes that compile in the `tokenizers` engine (oniguruma) and in `regex` alike."""
    from tokenizers import Regex

    for regexes, _, _ in PRE_TOKENIZERS.values():
        for expression in regexes:
            Regex(expression)
            regex.compile(expression)
    assert {"default", "qwen2", "llama-bpe", "smollm", "gpt-2"} <= set(PRE_TOKENIZERS)
