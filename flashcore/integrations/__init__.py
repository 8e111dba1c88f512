"""Integrations of FlashCore's kernels with other libraries (each module imports its library on import)."""
