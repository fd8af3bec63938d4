"""What the faces read and write: FusionBench's ``llm_slerp`` YAML and mergekit YAML (both become a
:class:`~slerp_plugin.spec.MergeSpec`), the merge manifest, and the model card."""
