"""The ``slerp-merge`` command (:mod:`.main`): the seed's config through Hydra (:mod:`.hydra_app`),
subcommands (:mod:`.commands`), and the process settings only the command makes (:mod:`.process`)."""
