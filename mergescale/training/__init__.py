"""Fine-tuning with DeepSpeed ZeRO: expert, multitask and instruction-tuning recipes."""
