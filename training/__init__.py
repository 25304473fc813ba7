"""Training, evaluation and command-line tools for the supportlens models."""
