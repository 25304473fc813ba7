"""HTTP inference service: intent classification and extractive summarization on LitServe."""
