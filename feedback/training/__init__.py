"""The training job (torch): pairs from the store -> a LoRA candidate -> the gate -> the registry -> the worker."""
