"""Model merging jobs: LoRA adapters into their base (``lora``) and MergeKit YAML merges (``mergekit_job``).

Nothing imported here loads torch: the config layer uses :mod:`.yaml_config` on the main
thread while the worker answers ``submit``.
"""
