"""The ``sweep`` job config: a hyperparameter search over training runs (Optuna underneath).

A sweep is a whole train config (``train``) plus a ``search_space``: a map from a dotted key of
the train config (``training_parameters.learning_rate``, ``peft.r``) to the values it may take.
Each trial is that train config with the sampled values set, trained in its own folder
``trial-N`` inside ``train.output_dir``, which is the sweep's folder (the study's journal and the
trials table sit beside the trial folders). Trials are compared on their final held-out loss.

Everything is checked at ``validate``: each searched key must be a setting of the train config,
and the train config must stay valid at every bound and choice of the space (a rank below the
AdaLoRA start rank, a dropout of 1.0), each problem named at its ``search_space`` key. Nothing
here imports torch or optuna: ``submit`` must answer at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from finetune_worker.config.base import MAX_SEED, StrictModel
from finetune_worker.config.paths import json_path
from finetune_worker.config.train import TrainConfig
from finetune_worker.errors import ConfigIssue
from finetune_worker.kinds import JobKind
from finetune_worker.outputs import LOCK_FILE, overlap_issue
from finetune_worker.security import PATH_KEYS

#: The sweep's own files in its folder (the trial folders are ``trial-N``).
SWEEP_MARKER = ".finetune-worker-sweep.json"
JOURNAL = "study.journal"
TRIALS_JSON = "trials.json"
TRIALS_CSV = "trials.csv"
TRIAL_PREFIX = "trial-"
#: Trials a tpe or random sweep runs when ``trials`` is not set.
DEFAULT_TRIALS = 10
#: Largest grid a grid sweep may enumerate (each point is a training run).
MAX_GRID = 10_000

#: Train-config keys a sweep may not search, and why (a prefix covers its section).
NOT_SEARCHABLE: dict[str, str] = {
    "job": "the sweep's trials are train jobs",
    "output_dir": "the sweep sets each trial's folder (trial-N inside train.output_dir)",
    "resume": "the sweep resumes its trials itself (set resume at the top level)",
    "overwrite": "the sweep decides it (set overwrite at the top level)",
    "distributed": "a sweep runs its trials in the worker, one at a time",
    "tracking": "tracking settings are the same for every trial",
    # The trials are compared on their held-out loss: it must be measured on the same rows, the
    # same tokens and the same loss in every trial.
    "dataset": "it changes the held-out rows the trials are compared on",
    "data": "it changes how the held-out rows are tokenized and scored, so losses would not compare",
    "evaluation": "it changes what is scored, so losses would not compare",
    "preference": "it changes what the preference loss measures, so losses would not compare",
    "seed": "it also draws the held-out split, so the trials would be compared on different rows",
}


class SearchParam(StrictModel):
    """The values one train-config key may take in the sweep (an Optuna distribution)."""

    type: Literal["float", "int", "categorical"] = Field(
        ...,
        description="float: a real number in [low, high]; int: a whole number in [low, high]; "
        "categorical: one of choices.",
    )
    low: float | None = Field(None, description="float and int: the smallest value.")
    high: float | None = Field(None, description="float and int: the largest value.")
    log: bool = Field(
        False,
        description="float and int: sample on a log scale (learning rates, ranks); needs low > 0, no step.",
    )
    step: float | None = Field(
        None,
        gt=0,
        description="float and int: only low, low + step, low + 2 step, ... (int default 1); the grid "
        "sampler needs it for floats.",
    )
    choices: list[str | int | float | bool | None] | None = Field(
        None, min_length=1, max_length=100, description="categorical: the values to choose from."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SearchParam:
        if self.type == "categorical":
            if self.choices is None:
                raise ValueError("a categorical parameter needs choices")
            extra = [k for k in ("low", "high", "step") if getattr(self, k) is not None]
            if extra or self.log:
                raise ValueError(
                    f"a categorical parameter takes choices only, not {', '.join(extra) or 'log'}"
                )
            if len({json.dumps(c) for c in self.choices}) != len(self.choices):
                raise ValueError("choices must differ from each other")
            return self
        if self.choices is not None:
            raise ValueError(
                f"choices belong to categorical parameters; a {self.type} one takes low and high"
            )
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs low and high")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("set log or step, not both")
        if self.type == "int":
            odd = [
                k
                for k in ("low", "high", "step")
                if getattr(self, k) is not None and not getattr(self, k).is_integer()
            ]
            if odd:
                raise ValueError(f"an int parameter needs whole numbers: {', '.join(odd)}")
        return self

    @property
    def int_step(self) -> int:
        return int(self.step or 1)

    def grid(self) -> list[Any] | None:
        """Every value the parameter can take, or None when they are not countable (a float
        without step). Longer than MAX_GRID: the first MAX_GRID + 1."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return list(
                itertools.islice(range(int(self.low), int(self.high) + 1, self.int_step), MAX_GRID + 1)
            )
        if self.step is None:
            return None
        count = min(math.floor((self.high - self.low) / self.step + 1e-9) + 1, MAX_GRID + 1)
        return [float(f"{self.low + k * self.step:.12g}") for k in range(count)]

    def bounds(self) -> list[tuple[str, Any]]:
        """``(where, value)`` of the values a validation tries: the ends of a range (the last
        value the step reaches), every choice."""
        if self.choices is not None:
            return [(f"choices[{i}]", c) for i, c in enumerate(self.choices)]
        assert self.low is not None and self.high is not None
        if self.type == "int":
            low, high = int(self.low), int(self.high)
            return [("low", low), ("high", high - (high - low) % self.int_step)]
        if self.step is None:
            return [("low", self.low), ("high", self.high)]
        steps = math.floor((self.high - self.low) / self.step + 1e-9)
        return [("low", self.low), ("high", float(f"{self.low + steps * self.step:.12g}"))]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (a ``first_trials`` value)."""
        if self.choices is not None:
            return any(json.dumps(value) == json.dumps(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if self.type == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high


class PruningSection(StrictModel):
    """Stop trials early whose held-out loss falls behind the finished trials' (Optuna's
    PercentilePruner, the median by default)."""

    enabled: bool = Field(
        True, description="Prune; false keeps the settings but runs every trial to its end."
    )
    percentile: float = Field(
        50.0,
        gt=0,
        lt=100,
        description="A trial stops when its best held-out loss so far is worse than this percentile of the "
        "finished trials' at the same step (50: the median; lower prunes more).",
    )
    startup_trials: int = Field(
        2, ge=1, description="Finished (not pruned) trials needed before any trial is pruned."
    )
    warmup_evaluations: int = Field(
        1,
        ge=0,
        description="Evaluations a trial makes before it may be pruned (its first losses are the noisiest).",
    )
    min_trials: int = Field(
        1, ge=1, description="Finished trials that must have evaluated at a step for it to prune there."
    )


class SweepConfig(StrictModel):
    """A hyperparameter sweep: several training trials over a search space."""

    job: Literal["sweep"] = Field("sweep", description="Job kind.")
    train: TrainConfig = Field(
        ...,
        description="The train config every trial starts from. Its output_dir is the sweep's folder: trial N "
        "trains in trial-N inside it. It needs held-out data (dataset.validation_split above 0).",
    )
    search_space: dict[str, SearchParam] = Field(
        ...,
        min_length=1,
        max_length=32,
        description='What to search: a dotted key of the train config ("training_parameters.learning_rate", '
        '"peft.r") -> its values ({"type": "float", "low": 1e-5, "high": 1e-2, "log": true}).',
    )
    trials: int | None = Field(
        None,
        gt=0,
        le=10_000,
        description=f"How many trials to run in all (failed and pruned ones count); default: the whole grid "
        f"for sampler grid, else {DEFAULT_TRIALS}. A resumed sweep runs until it has this many.",
    )
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe",
        description="How values are picked: tpe (Optuna's default, learns from the finished trials), random, "
        "or grid (every combination; floats need a step).",
    )
    random_trials: int = Field(
        5,
        ge=0,
        description="tpe: trials sampled at random before TPE models the results (Optuna's n_startup_trials).",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seeds the sampler (trial N draws with seed + N, so a resumed sweep samples as an "
        "uninterrupted one); default: train.seed.",
    )
    direction: Literal["minimize"] = Field(
        "minimize",
        description="The objective: minimize each trial's final held-out loss (final_eval_loss in its summary).",
    )
    first_trials: list[dict[str, str | int | float | bool | None]] = Field(
        default_factory=list,
        max_length=1000,
        description="Values to try before sampling (your current config's, say): each a map of search_space "
        "keys to values; keys left out are sampled. Not with sampler grid.",
    )
    pruning: PruningSection | None = Field(
        None,
        description="Stop trials early whose held-out loss falls behind; needs train.eval.every_steps. "
        "null: every trial runs to its end.",
    )
    resume: Literal["auto"] | bool = Field(
        "auto",
        description="auto: continue the sweep in train.output_dir when it holds one of this config (finished "
        "trials are kept, one a stop interrupted runs again with the same values, from its checkpoint), "
        "else start fresh; true: continue one or refuse; false: start fresh (needs overwrite when one is there).",
    )
    overwrite: bool = Field(
        False,
        description="Allow starting fresh in a folder that holds another sweep (its trial folders, journal "
        "and table are deleted).",
    )

    # ---- derived values -------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """The sweep's folder (``train.output_dir``, resolved)."""
        return self.resolved(self.train.output_dir)

    @property
    def trial_count(self) -> int:
        if self.trials is not None:
            return self.trials
        if self.sampler == "grid":
            return self.grid_size() or 1
        return DEFAULT_TRIALS

    @property
    def sampler_seed(self) -> int:
        return self.train.seed if self.seed is None else self.seed

    def grid_size(self) -> int | None:
        """How many combinations the space holds (None when a float has no step)."""
        size = 1
        for param in self.search_space.values():
            values = param.grid()
            if values is None:
                return None
            size *= len(values)
        return size

    def trial_dir(self, number: int) -> Path:
        return self.folder / f"{TRIAL_PREFIX}{number}"

    def trial_config(self, params: Mapping[str, Any], number: int = 0) -> TrainConfig:
        """The train config of trial ``number`` with ``params`` set (raises ValidationError)."""
        raw = self.train.model_dump(mode="json", exclude_unset=True)
        for key, value in params.items():
            _set_key(raw, key.split("."), value)
        raw.update(output_dir=str(self.trial_dir(number)), resume="auto", overwrite=True)
        return TrainConfig.model_validate(raw)

    def fingerprint(self) -> str:
        """What makes a stored sweep this sweep: the trials' train config and the space (not how
        many trials, the sampler or the pruning, which a resumed sweep may change)."""
        train = self.train.model_dump(mode="json")
        for key in ("resume", "overwrite", "tracking"):
            train.pop(key, None)
        train["output_dir"] = str(self.folder)
        train["model_name"] = str(self.resolved(self.train.model_name))
        data = {
            "train": train,
            "search_space": {k: v.model_dump(mode="json") for k, v in sorted(self.search_space.items())},
            "direction": self.direction,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # ---- checks beyond the schema -----------------------------------------------------------

    def semantic_issues(self) -> list[ConfigIssue]:
        """Cross-field problems (no file system access)."""
        issues: list[ConfigIssue] = []
        train = self.train
        for key in ("resume", "overwrite"):
            if key in train.model_fields_set:
                issues.append(
                    ConfigIssue(
                        f"train.{key}",
                        f"the sweep decides it for each trial: set {key} at the top level (it applies to the sweep)",
                        getattr(train, key),
                    )
                )
        if train.distributed is not None:
            issues.append(
                ConfigIssue("train.distributed", "a sweep runs its trials in the worker, one at a time")
            )
        if not train.holds_out:
            issues.append(
                ConfigIssue(
                    "train.dataset.validation_split",
                    "a sweep compares its trials on their held-out loss: set it above 0",
                )
            )
        pruning = self.pruning
        if pruning is not None and pruning.enabled and train.eval.every_steps is None:
            issues.append(
                ConfigIssue(
                    "train.eval.every_steps",
                    "pruning compares trials at their evaluations during training: set eval.every_steps",
                )
            )
        issues += self._space_issues()
        issues += self._sampler_issues()
        return issues

    def _space_issues(self) -> list[ConfigIssue]:
        issues: list[ConfigIssue] = []
        base = {(i.path, i.message) for i in _trial_issues(self, {})}
        for key, param in self.search_space.items():
            where = f"search_space.{key}"
            problem = searchable_issue(key, param)
            if problem is not None:
                issues.append(ConfigIssue(where, problem))
                continue
            for part, value in param.bounds():
                found = [i for i in _trial_issues(self, {key: value}) if (i.path, i.message) not in base]
                issues += [
                    ConfigIssue(
                        f"{where}.{part}",
                        f"with {key} = {json.dumps(value)} the train config is invalid: train.{i.path}: {i.message}",
                        value,
                    )
                    for i in found
                ]
        return issues

    def _sampler_issues(self) -> list[ConfigIssue]:
        issues = []
        for i, values in enumerate(self.first_trials):
            for key, value in values.items():
                param = self.search_space.get(key)
                if param is None:
                    issues.append(ConfigIssue(f"first_trials[{i}].{key}", "not a key of search_space", value))
                elif not param.contains(value):
                    issues.append(
                        ConfigIssue(f"first_trials[{i}].{key}", "outside the key's search space", value)
                    )
        if self.sampler != "grid":
            return issues
        if self.first_trials:
            issues.append(ConfigIssue("first_trials", "the grid sampler tries every combination already"))
        floats = [k for k, p in self.search_space.items() if p.grid() is None]
        issues += [
            ConfigIssue(
                f"search_space.{k}.step", "the grid sampler needs a step for a float (or make it categorical)"
            )
            for k in floats
        ]
        size = self.grid_size()
        if size is not None and size > MAX_GRID:
            issues.append(ConfigIssue("search_space", f"the grid holds over {MAX_GRID} combinations"))
        elif size is not None and self.trials is not None and self.trials > size:
            issues.append(
                ConfigIssue(
                    "trials",
                    f"the grid holds {size} combinations: at most {size} trials (leave trials out to run them all)",
                    self.trials,
                )
            )
        return issues

    @classmethod
    def partial_issues(cls, raw: dict[str, object]) -> list[ConfigIssue]:
        """The train config's model and data problems when the sweep's schema failed elsewhere."""
        train = raw.get("train")
        if not isinstance(train, dict):
            return []
        return [_prefixed(i) for i in TrainConfig.partial_issues(train)]

    def environment_issues(self) -> list[ConfigIssue]:
        """Problems a glance at the file system reveals; run at submit, before anything heavy."""
        from finetune_worker.extras import missing_extra

        missing = missing_extra("optuna")
        issues = [ConfigIssue("job", missing)] if missing else []
        issues += self.semantic_issues()
        if issues:
            return issues
        # Trial 0's config at the train config's own values: the model, the data, the folder.
        first = self.trial_config({})
        issues += [_prefixed(i) for i in first.environment_issues() if i.path != "output_dir"]
        problem = self.folder_issue()
        if problem is not None:
            issues.append(ConfigIssue("train.output_dir", problem, self.train.output_dir))
        return issues

    def folder_issue(self) -> str | None:
        """Why the sweep cannot use its folder now, or None (submit-time and run-time checks alike)."""
        out, shown = self.folder, self.train.output_dir
        if out.exists() and not out.is_dir():
            return f"'{shown}' exists and is not a directory"
        probe = next(p for p in (out, *out.parents) if p.exists())
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            return f"'{shown}' cannot be written by this user (nearest existing path: {probe})"
        inputs: list[tuple[str, Any]] = [("train.model_name", self.resolved(self.train.model_name))]
        clash = overlap_issue(out, inputs, contains=False)
        if clash is not None:
            return f"'{shown}' {clash}; choose another output_dir"
        stored = self.stored_fingerprint()
        if stored is None:
            if self.resume is True:
                return f'\'{shown}\' holds no sweep to resume; set "resume": "auto" to start one'
            foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
            if foreign and not self.overwrite:
                return (
                    f"'{shown}' holds files that are not a sweep of this worker ({', '.join(foreign[:5])}); "
                    'choose an empty or new output_dir, or set "overwrite": true to write beside them'
                )
            return None
        if self.resume is True and stored != self.fingerprint():
            return (
                f"'{shown}' holds a sweep of a different train config or search space: it cannot be resumed"
            )
        if self.overwrite or self.resume is True:
            return None
        if self.resume is False:
            return (
                f"'{shown}' holds an earlier sweep and resume is false; set \"overwrite\": true to replace it, "
                '"resume": "auto" to continue it, or choose another output_dir'
            )
        if stored != self.fingerprint():
            return (
                f"'{shown}' holds a sweep of a different train config or search space; choose another "
                'output_dir, or set "overwrite": true to replace it'
            )
        return None

    def stored_fingerprint(self) -> str | None:
        """The fingerprint of the sweep stored in the folder, or None when it holds none."""
        try:
            data = json.loads((self.folder / SWEEP_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        value = data.get("fingerprint") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    def continues(self) -> bool:
        """Whether the run continues the stored sweep (else it starts fresh)."""
        return self.resume is not False and self.stored_fingerprint() == self.fingerprint()


def searchable_issue(key: str, param: SearchParam) -> str | None:
    """Why ``key`` cannot be searched with ``param``'s values, or None."""
    from finetune_worker.config.suggest import suggestion

    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        why = NOT_SEARCHABLE.get(".".join(parts[:n]))
        if why is not None:
            return f"{key} cannot be searched: {why}"
    annotation = _annotation_at(TrainConfig, parts)
    if isinstance(annotation, str):
        meant = suggestion(TrainConfig, tuple(parts))
        hint = f" (did you mean {meant}?)" if meant and meant != key else ""
        return f"{annotation}{hint}"
    if parts[-1] in PATH_KEYS:
        return f"{key} is a path: paths cannot be searched"
    numeric = _numeric_kind(annotation)
    if param.type == "float" and numeric != "float":
        kind = "a whole number: use type int" if numeric == "int" else "not a number: use type categorical"
        return f"{key} is {kind}"
    if param.type == "int" and numeric is None:
        return f"{key} is not a number: use type categorical"
    return None


def _annotation_at(model: type[BaseModel], parts: list[str]) -> Any:
    """The annotation of the setting at ``parts`` (through sections), or why there is none (a str)."""
    annotation: Any = None
    for i, part in enumerate(parts):
        if i:
            section = _section(annotation)
            if section is None:
                return f"{'.'.join(parts[:i])} is a setting, not a section"
            model = section
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:i]) or "the train config"
            return f"{'.'.join(parts)} is not a setting of the train config (no {part!r} in {where})"
        annotation = field.annotation
    if _section(annotation) is not None:
        return f"{'.'.join(parts)} is a section: search one of its settings"
    return annotation


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (``Section`` or ``Section | None``); None for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        models = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(models) == 1:
            return _section(models[0])
    return None


def _numeric_kind(annotation: Any) -> str | None:
    """ "float" or "int" for a numeric setting (``float``, ``int | None``...), None otherwise."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        args = [annotation]
    if not args or any(a not in (int, float) for a in args):
        return None
    return "float" if float in args else "int"


def _set_key(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``raw[parts[0]][parts[1]]... = value``, making the sections on the way."""
    for part in parts[:-1]:
        section = raw.get(part)
        if not isinstance(section, dict):
            section = raw[part] = {}
        raw = section
    raw[parts[-1]] = value


def _trial_issues(cfg: SweepConfig, params: Mapping[str, Any], number: int = 0) -> list[ConfigIssue]:
    """What the train config with ``params`` set gets wrong (its schema and cross-field checks)."""
    from finetune_worker.config import issues_from_validation

    try:
        trial = cfg.trial_config(params, number)
    except ValidationError as exc:
        return issues_from_validation(exc, TrainConfig)
    return trial.semantic_issues()


def trial_config_issues(cfg: SweepConfig, params: Mapping[str, Any], number: int = 0) -> list[str]:
    """What is wrong with trial ``number``'s train config, each as ``train.PATH: message``."""
    return [str(_prefixed(i)) for i in _trial_issues(cfg, params, number)]


def _prefixed(issue: ConfigIssue) -> ConfigIssue:
    return ConfigIssue(
        json_path(["train", issue.path]) if issue.path else "train", issue.message, issue.value
    )


KINDS = (
    JobKind(
        "sweep",
        SweepConfig,
        run="finetune_worker.training.sweep:run",
        recognise=lambda keys: "search_space" in keys,
        order=25,
    ),
)
