"""Version 1 of the contract: common, vision, audio and orchestrator messages and services (generated stubs)."""
