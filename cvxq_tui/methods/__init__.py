"""Quantization methods. Each turns a float layer into a PackedLinear (cvxq_tui.packed)
under a share of the model's all-in budget."""
