"""How far quantized predictions may stray from float32 ones: the export tests hold the
int8 program to them, and the scoring tests the int8 scores."""

# int8 rows (row-wise scale/bias) against float32 tables, on the model and data of
# tests/integration/test_export.py
INT8_MAX_PROB_DIFF = 5e-3
INT8_MAX_AUC_LOSS = 2e-3
