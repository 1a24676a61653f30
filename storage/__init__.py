"""Object store, artifact formats, digests and MLflow lineage: the I/O edge of mergeline."""
