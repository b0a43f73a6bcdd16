"""Input: image sources, host-side augmentation and the Grain pipeline."""
