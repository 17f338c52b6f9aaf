"""AudioLDM2 sound-effect service: backend interface, diffusers and Triton backends, micro-batching."""
