"""What the three gRPC services share: server start-up (health, reflection, metrics, signals),
error mapping, image checks, audio encoding, and running blocking model code from asyncio."""
