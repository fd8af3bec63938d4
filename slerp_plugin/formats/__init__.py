"""What the faces read and write: the seed's FusionBench YAML and mergekit YAML (both become a
:class:`~slerp_plugin.spec.MergeSpec`), the merge manifest, and the model card."""
