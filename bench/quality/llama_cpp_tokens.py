"""Token ids llama.cpp gives: run with the Python of an environment that has llama-cpp-python (never the project's).

stdin: {"model": GGUF path, "texts": [...]}; stdout: [[ids], ...], each text tokenized as llama.cpp's
own programs do (`add_special`: the file's BOS where it asks for one; special tokens parsed).
"""

import json
import sys

from llama_cpp import Llama

request = json.load(sys.stdin)
model = Llama(model_path=request["model"], vocab_only=True, verbose=False)
json.dump([model.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in request["texts"]], sys.stdout)
