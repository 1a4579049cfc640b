"""The training-time loader: samples, images to patches, packed rows and batches.

The offline dataset writers are in megavl.datasets.
"""
