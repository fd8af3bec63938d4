"""The ``slerp-merge`` command (:mod:`.main`): FusionBench's ``llm_slerp`` config through Hydra
(:mod:`.hydra_app`), subcommands (:mod:`.commands`), and the process settings only the command
makes (:mod:`.process`)."""
