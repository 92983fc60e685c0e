"""What the Python runtime gives, for the JavaScript tests to compare with (run by them with the project's Python).

stdin: {"export": DIR, "bank": DIR, "make_bank": bool, "cases": [{"op": "generate"|"classify"|"chat", ...}]}.
With `make_bank`, first writes into `bank` (schema 2) one task of each kind the fixture bank lacks: a float16 prompt
with a template and labels, a P-tuning pattern and a prefix. stdout: one result per case.
"""

import json
import sys

import numpy as np

from softprompt.prompt_bank import save_prompt
from softprompt.runtime import load

request = json.load(sys.stdin)
if request.get("make_bank"):
    from softprompt.formats.bank import save_prefix as write_prefix
    from softprompt.formats.export_folder import read_config

    config = read_config(request["export"])
    rng = np.random.default_rng(7)
    width = config.hidden_size
    save_prompt(
        request["bank"],
        "half",
        (rng.standard_normal((3, width)) * 0.5).astype(np.float16),
        fingerprint=config.fingerprint,
        extra={"template": "Q: {text}\nA:", "labels": {"yes": " yes", "no": " no way"}},
    )
    save_prompt(
        request["bank"],
        "pattern",
        (rng.standard_normal((5, width)) * 0.5).astype(np.float32),
        fingerprint=config.fingerprint,
        extra={"template": "{soft:2}Review: {text}{soft:2} so{soft:1}"},
    )
    past = rng.standard_normal((2 * config.num_layers, config.num_kv_heads, 4, config.head_size)).astype(np.float32) * 0.5
    write_prefix(request["bank"], "prefix", past, fingerprint=config.fingerprint)

model = load(request["export"], bank=request["bank"])
out = []
for case in request["cases"]:
    settings = case.get("settings", {})
    if case["op"] == "generate":
        row = model.complete(case["text"], task=case.get("task"), **settings)[0]
        out.append(
            {
                "ids": row.token_ids,
                "text": row.text,
                "finish": row.finish_reason,
                "stream": "".join(model.stream(case["text"], task=case.get("task"), **settings)),
            }
        )
    elif case["op"] == "classify":
        out.append(model.classify(case["text"], task=case["task"])[0])
    elif case["op"] == "chat":
        row = model.chat(case["messages"], task=case.get("task"), **settings)
        out.append(
            {"ids": row.token_ids, "text": row.text, "rendered": model.render_chat(case["messages"], task=case.get("task"))}
        )
json.dump(out, sys.stdout)
