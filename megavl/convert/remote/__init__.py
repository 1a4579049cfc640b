"""Model code shipped inside exported folders for transformers' trust_remote_code=True.

These files import only torch and transformers: they run where megavl is not installed.
"""
