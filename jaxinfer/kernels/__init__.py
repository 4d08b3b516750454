"""Native kernels below the model: `cpu` holds XLA FFI custom calls for CPU."""
