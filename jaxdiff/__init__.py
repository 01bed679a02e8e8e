"""jaxdiff: pure-functional JAX diffusion models."""
