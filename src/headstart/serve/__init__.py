"""Using a trained model: the saved artifact (`artifact`)."""
