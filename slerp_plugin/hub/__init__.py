"""The Hugging Face Hub: pinned, verified downloads, idempotent uploads (:mod:`.client`), and model
references resolved to local folders (:mod:`.sources`)."""
