"""The image_to_sound gRPC contract. The modules under v1/ are generated from protos/image_to_sound/v1/*.proto
(setup.py or `make protos`)."""
