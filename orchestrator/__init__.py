"""The orchestrator: chains the VLM and audio services (pipelined), the seed command line, and the client."""
