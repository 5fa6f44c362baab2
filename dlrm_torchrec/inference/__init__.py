"""After training: export to a single-host program (`export`, ONNX in `onnx`), scoring
raw rows (`score`), and importing a model saved by the DLRM reference
(`import_reference`)."""
