"""Offline dataset writers: conversation datasets and the synthetic corpus -> energon-ready WebDataset shards.

The training-time loader that reads them is megavl.data.
"""
