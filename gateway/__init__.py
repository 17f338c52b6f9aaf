"""The orchestrator's HTTP front: its gRPC API over HTTP/1.1 and HTTP/2 (Connect, gRPC-Web, and JSON lines
for curl), and the browser page at `/`. Every call is forwarded to the orchestrator's own gRPC server, so
tokens, validation, admission, deadlines and error mapping are the gRPC port's, not a second copy."""
