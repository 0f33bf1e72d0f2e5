"""samed2-kit: fine-tune SAM 2 for medical image segmentation."""

__version__ = "0.1.0"
