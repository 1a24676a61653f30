"""The GPU tier: `make test-gpu` on a machine with CUDA."""
