"""The orchestrator service: chains the VLM and audio services with pipelining, validates and admits requests."""
