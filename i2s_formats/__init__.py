"""The data formats both sides of the wire share: the request contract (contract), the sound-description
format of the seed's JSON files (seed_format) and the audio encodings of the streamed clips (audio_encoding).
Used by the services, the client and the command line alike; imports only the generated messages and
serving (errors, image checks, file helpers)."""
