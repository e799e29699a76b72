"""The serving engine: requests scheduled over a paged KV cache (continuous batching)."""
