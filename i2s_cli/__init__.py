"""The research command line (`i2s`, `python main.py`): embedded start-up of the three services, the model
preflight, the run over a folder of images with resume, the Phase 2 export and the run's gallery.

A client of the orchestrator like any other: it imports i2s_client, i2s_formats and serving, and starts the
services as child processes, never importing their modules."""
