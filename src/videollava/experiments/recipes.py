"""The ablation arms as recipes: a base recipe, the scale's changes, the arm's edits, the seed.

An arm file (`configs/ablations/<arm>.yaml`) names its base recipe and lists edits of its stages by
name; a scale file (`scale-<scale>.yaml`) holds what that scale changes in the base (merged into
the recipe, and into every stage of a kind) and how evaluation runs. The recipe of one arm and one
seed is: the base, then the scale (so an arm's copies of a stage are copies of the scaled stage),
then the arm's edits, then the seed (`model.init.seed` and every training stage's `seed`), then the
shared data folder. It is an ordinary recipe: `videollava train` runs the copy each run folder
keeps in `recipe.yaml`.

Edits, applied in order, each naming a stage of the recipe by its label:
- `update: NAME` merges `with` into that stage;
- `replace: NAME` puts `with` in its place;
- `insert_after: NAME` puts `with` right after it.
With `from: OTHER` (and optionally `keys: [...]`), `with` is merged over those keys (default all)
of stage OTHER as it stood after scaling, so a replacement keeps the steps and batch of the stage
it replaces at every scale.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from videollava.errors import VideoLlavaError
from videollava.train.config import Recipe, TrainStage, recipe_from_dict

# The arms of the two claims. "joint" is united's recipe (today's): one run per seed serves both.
ARM_FILES = {
    "united": "united.yaml",
    "separated-mae": "separated-mae.yaml",
    "separated-text": "separated-text.yaml",
    "video-only": "video-only.yaml",
    "image-only": "image-only.yaml",
}
ALIASES = {"joint": "united"}
ARMS = ("united", "separated-mae", "separated-text", "joint", "video-only", "image-only")
SCALES = ("smoke", "full")


class ExperimentError(VideoLlavaError):
    """An experiment that cannot run as asked; the message names the file or option at fault."""


def run_arm(arm: str) -> str:
    """The arm whose run stands for `arm` (the same recipe runs once)."""
    if arm not in ARMS:
        raise ExperimentError(f"unknown arm {arm!r}; the arms are {', '.join(ARMS)}")
    return ALIASES.get(arm, arm)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        raise ExperimentError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping")
    return data


def deep_merge(base: Any, changes: Any) -> Any:
    """`changes` over `base`: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(changes, dict):
        out = dict(base)
        for key, value in changes.items():
            out[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(changes)


@dataclass
class Scale:
    """What one scale changes in the base recipe, and how its models are evaluated."""

    name: str
    description: str
    recipe: dict[str, Any] = field(default_factory=dict)  # merged into the recipe
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # merged into every stage of a kind
    eval_batch_size: int = 1
    eval_limit: int | None = None
    text: str = ""  # the file as written, quoted in the report

    @classmethod
    def load(cls, configs: Path, name: str) -> Scale:
        if name not in SCALES:
            raise ExperimentError(f"--scale {name!r}: expected one of {', '.join(SCALES)}")
        path = configs / f"scale-{name}.yaml"
        data = _read_yaml(path)
        unknown = sorted(set(data) - {"description", "recipe", "stages", "eval"})
        if unknown:
            raise ExperimentError(f"{path}: unknown keys {unknown}; valid: description, recipe, stages, eval")
        evaluation = data.get("eval") or {}
        bad = sorted(set(evaluation) - {"batch_size", "limit"})
        if bad:
            raise ExperimentError(f"{path}: eval: unknown keys {bad}; valid: batch_size, limit")
        return cls(
            name=name,
            description=str(data.get("description", "")).strip(),
            recipe=data.get("recipe") or {},
            stages=data.get("stages") or {},
            eval_batch_size=int(evaluation.get("batch_size", 1)),
            eval_limit=evaluation.get("limit"),
            text=path.read_text(),
        )


def _label(stage: dict[str, Any]) -> str:
    return str(stage.get("name") or stage.get("kind"))


def _index(stages: list[dict[str, Any]], name: str, where: str) -> int:
    for i, stage in enumerate(stages):
        if _label(stage) == name:
            return i
    raise ExperimentError(f"{where}: no stage named {name!r}; the stages are {[_label(s) for s in stages]}")


def apply_edits(raw: dict[str, Any], edits: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """The recipe with an arm's stage edits applied (see the module's docstring)."""
    out = copy.deepcopy(raw)
    before = copy.deepcopy(raw["stages"])  # `from` reads the stages as they were before any edit
    for number, edit in enumerate(edits):
        at = f"{where}: edits[{number}]"
        if not isinstance(edit, dict):
            raise ExperimentError(f"{at}: expected a mapping")
        actions = [a for a in ("update", "replace", "insert_after") if a in edit]
        if len(actions) != 1:
            raise ExperimentError(f"{at}: give exactly one of update, replace, insert_after")
        unknown = sorted(set(edit) - {actions[0], "with", "from", "keys"})
        if unknown:
            raise ExperimentError(f"{at}: unknown keys {unknown}")
        content: dict[str, Any] = {}
        if "from" in edit:
            source = before[_index(before, str(edit["from"]), at)]
            keys = edit.get("keys")
            content = copy.deepcopy(source if keys is None else {k: source[k] for k in keys if k in source})
        elif "keys" in edit:
            raise ExperimentError(f"{at}: 'keys' needs 'from'")
        content = deep_merge(content, edit.get("with") or {})
        stages = out["stages"]
        target = _index(stages, str(edit[actions[0]]), at)
        if actions[0] == "update":
            stages[target] = deep_merge(stages[target], content)
        elif actions[0] == "replace":
            stages[target] = content
        else:
            stages.insert(target + 1, content)
    return out


def _apply_scale(raw: dict[str, Any], scale: Scale) -> dict[str, Any]:
    out = deep_merge(raw, scale.recipe)
    kinds = {stage.get("kind") for stage in out["stages"]}
    unknown = sorted(set(scale.stages) - kinds)
    if unknown:
        raise ExperimentError(
            f"scale-{scale.name}.yaml: stages: no stage of kind {unknown} in the base recipe"
        )
    out["stages"] = [deep_merge(s, scale.stages.get(s.get("kind"), {})) for s in out["stages"]]
    return out


def _apply_seed(raw: dict[str, Any], seed: int) -> dict[str, Any]:
    """Seed `seed`: the model's initialisation and every training stage's data order."""
    out = copy.deepcopy(raw)
    out.setdefault("model", {}).setdefault("init", {})["seed"] = seed
    for stage in out["stages"]:
        if stage.get("kind") != "tokenizer":
            stage["seed"] = seed
    return out


@dataclass
class Arm:
    """One arm's file: its base recipe and its edits."""

    name: str
    path: Path
    base: Path
    edits: list[dict[str, Any]]
    summary: str  # the file's leading comment

    @classmethod
    def load(cls, configs: Path, name: str) -> Arm:
        if name not in ARM_FILES:
            raise ExperimentError(f"unknown arm {name!r}; the arms run are {', '.join(ARM_FILES)}")
        path = configs / ARM_FILES[name]
        data = _read_yaml(path)
        unknown = sorted(set(data) - {"base", "edits"})
        if unknown:
            raise ExperimentError(f"{path}: unknown keys {unknown}; valid: base, edits")
        if "base" not in data:
            raise ExperimentError(f"{path}: 'base' (the recipe the arm is built on) is missing")
        edits = data.get("edits") or []
        if not isinstance(edits, list):
            raise ExperimentError(f"{path}: edits: expected a list")
        comment = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
        return cls(name, path, (path.parent / data["base"]).resolve(), edits, " ".join(comment))

    def raw_recipe(self, scale: Scale, seed: int, data_root: Path) -> dict[str, Any]:
        """This arm's recipe at `scale` and `seed`, its data in the shared folder `data_root`."""
        raw = _read_yaml(self.base)
        raw = apply_edits(_apply_scale(raw, scale), self.edits, str(self.path))
        raw = _apply_seed(raw, seed)
        raw.setdefault("data", {})["root"] = str(Path(data_root).resolve())
        raw["data"].pop("media_root", None)
        return raw

    def recipe(self, scale: Scale, seed: int, data_root: Path) -> Recipe:
        return recipe_from_dict(self.raw_recipe(scale, seed, data_root), source=self.path)


# Run settings that change no number a stage computes.
_FREE_RUN_KEYS = ("progress", "keep_checkpoints", "export", "output_dir")


def shared_prefix(a: Recipe, b: Recipe) -> int:
    """How many leading stages two recipes share exactly, so that one run's results of them are the
    other's: the same model, data, process settings, and stage definitions (seeds included)."""
    da, db = a.to_dict(), b.to_dict()
    for key in ("model", "data", "distributed"):
        if da[key] != db[key]:
            return 0
    run_a = {k: v for k, v in da["run"].items() if k not in _FREE_RUN_KEYS}
    run_b = {k: v for k, v in db["run"].items() if k not in _FREE_RUN_KEYS}
    if run_a != run_b:
        return 0
    count = 0
    for stage_a, stage_b in zip(da["stages"], db["stages"], strict=False):
        if stage_a != stage_b:
            break
        count += 1
    return count


def optimiser_steps(recipe: Recipe) -> dict[str, int | None]:
    """Each training stage's fixed step count (None where it follows the data: epochs)."""
    return {s.label: s.max_steps for s in recipe.stages if isinstance(s, TrainStage)}
