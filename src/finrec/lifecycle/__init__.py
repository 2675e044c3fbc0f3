"""Model lifecycle: comparing versions on one window, and retraining on the feedback since the last training."""
