"""The knowledge base: chunks of code and docs indexed for retrieval-augmented generation."""
