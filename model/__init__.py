"""The model worker: loading, batching, generation and adapter swaps; and the tiny test-model builder."""
