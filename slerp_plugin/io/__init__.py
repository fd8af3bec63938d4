"""Bytes on disk: the safetensors format, direct and streamed reads and writes, the start-up
read-ahead, input checksums and model folders. Nothing here knows SLERP or the Hub."""
