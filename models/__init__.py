"""Model code: attention pooling, the intent classifier, the extractive summarizer,
explanation methods and the on-disk bundle format."""
