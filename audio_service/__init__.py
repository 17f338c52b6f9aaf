"""AudioLDM2 sound-effect service: backend interface, diffusers backend, micro-batching."""
