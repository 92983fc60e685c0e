"""softprompt.training: prompt tuning (Lester et al. 2021) with the backbone frozen (torch, transformers).

`train-prompt` learns a task's [P, E] soft prompt for a decoder, an encoder or an encoder-decoder,
building every row exactly as the runtime does, and saves it in the bank format with the
fingerprint of the model's export. Needs the `[train]` extra.
"""
