"""The pipeline's commands: `python -m stages.<name>`, each an arguments dataclass and a `main`.

The libraries they run are in `lco/` (the method: models, losses, pairs, retrieval) and `data_prep/`
(pages and eval sets); `common/` holds what every command shares (errors, artifacts, recipes, run records).
"""

import importlib
from pathlib import Path

from common.recipe import check_recipe as _check_recipe

# recipe section -> the dataclasses its keys fill (imported on demand: some commands import heavy libraries)
SECTION_TYPES = {
    "base_model": ("stages.base_model:BaseModelArguments",),
    "data_prep": ("data_prep.settings:DataPrepSettings",),
    "queries": ("lco.queries:QueriesSettings",),
    "pretrain": ("stages.pretrain:PretrainArguments", "trl:SFTConfig"),
    "contrast": ("stages.contrast:ContrastArguments",),
    "evaluate": ("stages.evaluate:EvaluateArguments",),
    "pipeline": ("stages.pipeline:PipelineArguments",),
    "analyze": ("stages.analyze:AnalyzeArguments",),
}


def section_types(section: str) -> tuple[type, ...]:
    """The dataclasses that recipe section `section` fills."""
    return tuple(
        getattr(importlib.import_module(module), name)
        for module, name in (target.split(":") for target in SECTION_TYPES[section])
    )


def check_recipe(path: str | Path) -> dict:
    """Check every key and value type of a recipe, all sections included; return the recipe."""
    return _check_recipe(path, {section: section_types(section) for section in SECTION_TYPES})
