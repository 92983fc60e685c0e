"""softprompt-onnx: one frozen ONNX backbone, per-task soft prompts in small banks.

The rooms, each its own package and its own extra: `softprompt.formats` (the export folder and bank
formats), `softprompt.runtime` (what ships to devices: `load`), `softprompt.prompt_bank`,
`softprompt.exporter` (`export_model`), `softprompt.training`, `softprompt.server` and
`softprompt.cluster`. Importing this package imports none of them, so a device's install pulls in
nothing it does not use.
"""
