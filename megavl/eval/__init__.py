"""Generation and task evaluation: answers from a checkpoint, scored against exact answers.

``generation.py`` answers prompts (megatron-core's KV cache, megavl's mask and positions);
``items.py`` reads evaluation items from a dataset's shards; ``answers.py`` parses and
scores one answer; ``task_eval.py`` runs a set of items on every data-parallel rank's
share and reduces the scores; ``loading.py`` builds a model from any saved checkpoint
for generation; ``lmms_task.py`` runs lmms-eval on an export; ``cli.py`` holds the options
the tools share.
"""
