"""Data: samples, images to patches, packed rows and batches."""
