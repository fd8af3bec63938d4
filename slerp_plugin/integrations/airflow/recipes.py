"""Nightly merge recipes: one YAML file per scheduled merge, read by the nightly DAG factory.

    name: dragon-momo          # DAG id: slerp_nightly_<name>
    schedule: "0 2 * * *"      # cron (default: 02:00 every night)
    model_1: ibivibiv/alpaca-dragon-72b-v1
    model_2: moreh/MoMo-72B-lora-1.8.7-DPO
    t: 0.5
    target_repo: my-org/dragon-momo-slerp   # empty: keep the merge locally
    # optional: model_1_revision, model_2_revision, tokenizer, DOT_THRESHOLD, epsilon, dtype,
    #           private, validate_functional, validation_margin, eval_max_tokens

A run re-merges only when a parent's commit (or t) differs from the last published merge.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import ConfigError, first_line
from ...spec import format_validation_error


class Recipe(BaseModel):
    """One nightly merge."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]+$")
    schedule: str = "0 2 * * *"
    model_1: str
    model_2: str
    model_1_revision: str = ""
    model_2_revision: str = ""
    tokenizer: str = ""
    t: float = Field(ge=0, le=1)
    DOT_THRESHOLD: float = Field(0.9995, gt=0, le=1)
    epsilon: float = Field(1e-8, gt=0)
    dtype: str = "auto"
    target_repo: str = ""
    private: bool = False
    validate_functional: bool = True
    validation_margin: float = 0.10
    eval_max_tokens: int = 512
    merge_workers: int = 1
    max_shard_size: str = "5GB"
    stream: bool = False
    disk_budget: str = ""

    @property
    def dag_id(self) -> str:
        return "slerp_nightly_" + re.sub(r"[^A-Za-z0-9_]", "_", self.name)

    def params(self) -> dict[str, Any]:
        return self.model_dump(exclude={"name", "schedule"})


def load_recipes(folder: Path | str) -> list[Recipe]:
    """Every ``*.yaml``/``*.yml`` recipe in ``folder`` (sorted by file name).

    Raises:
        ConfigError: a recipe that does not parse or validate, naming the file.
    """
    folder = Path(folder)
    recipes = []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            recipes.append(Recipe.model_validate(yaml.safe_load(path.read_text()) or {}))
        except ValidationError as e:
            raise ConfigError(f"{path}: {format_validation_error(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {first_line(e)}") from None
    names = [r.dag_id for r in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{folder}: two recipes share a name")
    return recipes
