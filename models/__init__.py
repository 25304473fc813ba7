"""Model code: attention pooling, the intent classifier, the extractive summarizer,
explanation methods and the on-disk bundle format.

Importing the package registers both models with the Auto classes, so after
``import models`` a bundle directory loads with ``AutoConfig`` / ``AutoModel`` (and the
classifier with ``AutoModelForSequenceClassification``) like any Hugging Face model,
without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from models.classifier import ClassifierConfig, IntentClassifier
from models.summarizer import ExtractiveSummarizer, SummarizerConfig

AutoConfig.register(ClassifierConfig.model_type, ClassifierConfig, exist_ok=True)
AutoConfig.register(SummarizerConfig.model_type, SummarizerConfig, exist_ok=True)
AutoModel.register(ClassifierConfig, IntentClassifier, exist_ok=True)
AutoModelForSequenceClassification.register(ClassifierConfig, IntentClassifier, exist_ok=True)
AutoModel.register(SummarizerConfig, ExtractiveSummarizer, exist_ok=True)

__all__ = ["ClassifierConfig", "ExtractiveSummarizer", "IntentClassifier", "SummarizerConfig"]
