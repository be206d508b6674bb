"""Training: SD3's rectified-flow objective, data, the loops (flow fine-tuning, Flash distillation)."""
