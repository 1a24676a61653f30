"""workers/search."""
