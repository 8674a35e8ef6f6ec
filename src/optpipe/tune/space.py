"""The search space of a recipe's `search:` section: every combination of the listed option values, each one a
complete recipe that `build` would accept.

Paths name options of the recipe's passes by index: `passes[3].block_size`, `passes[3].int8.edge_layers` (a field
inside an option), `passes[5].enabled` (false: the candidate goes without that pass). Indices are those of the
recipe as written, also when an earlier pass is switched off. `search.sensitivity` adds one more dimension: how
many of the measured most sensitive groups the INT4 pass keeps at INT8 (their patterns appended to its
`int8.include`; `ranking` is that list of patterns, most sensitive first, once measured).
"""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass

from ..errors import RecipeError
from ..pipeline import pass_for_target, registered_passes, validate_pass_chain
from ..recipe import SEARCH_PATH, Recipe, recipe_from_dict

ENABLED = "enabled"
SENSITIVE = "sensitivity.keep_int8"  # the settings key of a search.sensitivity count
NEVER = "(?!)"  # a regex that matches nothing: stands for a measured group before the ranking exists (validate)


@dataclass(frozen=True)
class Path:
    text: str
    index: int
    keys: tuple[str, ...]  # () only for `passes[I]` itself, which is not allowed; ("enabled",) switches the pass

    @classmethod
    def parse(cls, text: str) -> Path:
        m = SEARCH_PATH.match(text)
        assert m, text  # the recipe schema refused anything else
        return cls(text, int(m.group(1)), tuple(m.group(2).split(".")) if m.group(2) else ())


@dataclass
class Candidate:
    number: int  # 1-based, in enumeration order
    settings: dict  # path text -> value
    recipe: Recipe | None  # None when the combination is not a valid recipe
    invalid: str | None = None

    def label(self) -> str:
        return ", ".join(f"{p}={json.dumps(v)}" for p, v in self.settings.items())


def _apply(base: dict, settings: dict, sensitivity=None, ranking: list[str] | None = None) -> dict:
    out = copy.deepcopy(base)
    out.pop("search", None)
    dropped = set()
    for text, value in settings.items():
        if text == SENSITIVE:
            if value:
                node = out["passes"][sensitivity.pass_index]
                part = dict(node.get("int8") or {})
                part["include"] = list(part.get("include") or []) + (ranking or [NEVER] * value)[:value]
                node["int8"] = part
            continue
        path = Path.parse(text)
        if path.keys == (ENABLED,):
            if value is False:
                dropped.add(path.index)
            continue
        node = out["passes"][path.index]
        for key in path.keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{text}: {key} is not a mapping in this recipe")
        node[path.keys[-1]] = copy.deepcopy(value)
    out["passes"] = [p for i, p in enumerate(out["passes"]) if i not in dropped]
    return out


def _check_path(recipe: Recipe, source: str, text: str, values: list) -> None:
    """The path names an existing pass and one of its options (or `enabled`, with true/false values)."""
    where = f"{source}: search.space[{text!r}]"
    path = Path.parse(text)
    if not path.keys:
        raise RecipeError(f"{where}: name an option of the pass (passes[{path.index}].OPTION) or passes[{path.index}].enabled")
    if path.index >= len(recipe.passes):
        raise RecipeError(f"{where}: the recipe has {len(recipe.passes)} passes (passes[0] to passes[{len(recipe.passes) - 1}])")
    spec = recipe.passes[path.index]
    if path.keys == (ENABLED,):
        bad = [v for v in values if not isinstance(v, bool)]
        if bad:
            raise RecipeError(f"{where}: enabled takes true/false, not {bad[0]!r}")
        return
    if spec.path:  # a plugin: its options are checked when each candidate is validated
        return
    known = registered_passes().get(spec.name)
    if not known:
        return  # validate_pass_chain names the unknown pass
    fields = pass_for_target(known, recipe.target).Config.model_fields
    if path.keys[0] not in fields:
        raise RecipeError(f"{where}: pass {spec.name} has no option {path.keys[0]!r} (options: {', '.join(sorted(fields))})")


def _validated(data: dict, source: str, allow_plugins) -> Recipe:
    recipe = recipe_from_dict(data, source, allow_plugins)
    validate_pass_chain(recipe, source, allow_plugins)
    return recipe


def _check_sensitivity(recipe: Recipe, source: str, ranking: list[str] | None) -> None:
    spec = recipe.search.sensitivity
    where = f"{source}: search.sensitivity"
    if spec.pass_index >= len(recipe.passes):
        raise RecipeError(f"{where}.pass: the recipe has {len(recipe.passes)} passes")
    spec_pass = recipe.passes[spec.pass_index]
    known = registered_passes().get(spec_pass.name)
    if spec_pass.path or not known or "int8" not in pass_for_target(known, recipe.target).Config.model_fields:
        raise RecipeError(f"{where}.pass: passes[{spec.pass_index}] ({spec_pass.name}) has no int8.include to set "
                          "(quantize-int4 on cpu-onnx has)")
    if ranking is not None and max(spec.keep_int8) > len(ranking):
        raise RecipeError(f"{where}.keep_int8: {max(spec.keep_int8)} groups asked for, the model has "
                          f"{len(ranking)} that the pass quantizes")


def candidates(recipe: Recipe, allow_plugins: bool | None = None,
               ranking: list[str] | None = None) -> list[Candidate]:
    """Every combination, in order (the earliest pass varies slowest, so neighbours share the longest prefix of
    passes). A value that no valid candidate uses is an error naming it; a combination the pass chain refuses
    (say, a pass switched off that a later one needs, which another value of the space switches off too) is kept
    as an invalid candidate with the reason."""
    source = recipe.source_path or "<recipe>"
    if recipe.search is None:
        raise RecipeError(f"{source}: search: the recipe has no search section (optpipe tune needs one; see docs/tune.md)")
    space = dict(recipe.search.space)
    sens = recipe.search.sensitivity
    for text in space:
        _check_path(recipe, source, text, space[text])
    if sens is not None:
        _check_sensitivity(recipe, source, ranking)
        space[SENSITIVE] = sens.keep_int8
    paths = sorted(space, key=lambda t: (sens.pass_index if t == SENSITIVE else Path.parse(t).index, t))
    total = 1
    for text in paths:
        total *= len(space[text])
    if total > recipe.search.max_candidates:
        raise RecipeError(f"{source}: search.space: {total} combinations, more than search.max_candidates "
                          f"({recipe.search.max_candidates})")
    base = recipe.model_dump(mode="json", exclude={"search"})
    base_dict = {**base, "passes": [{"name": p.name, **({"path": p.path} if p.path else {}), **p.options}
                                    for p in recipe.passes]}
    out = []
    for n, combo in enumerate(itertools.product(*(space[t] for t in paths)), 1):
        settings = dict(zip(paths, combo))
        try:
            out.append(Candidate(n, settings, _validated(_apply(base_dict, settings, sens, ranking), source,
                                                         allow_plugins)))
        except RecipeError as e:
            why = str(e).removeprefix(source + ": ")
            off = [Path.parse(t).index for t, v in settings.items()
                   if t != SENSITIVE and Path.parse(t).keys == (ENABLED,) and v is False]
            if off:  # the candidate's own pass list is shorter: say so, or its indices would mislead
                why += (" (pass indices of the candidate, which goes without "
                        + ", ".join(f"passes[{i}] ({recipe.passes[i].name})" for i in sorted(off)) + ")")
            out.append(Candidate(n, settings, None, invalid=why))
    # a value no valid candidate uses is the user's mistake (a typo, a size the pass does not take), not a dead end
    for text in paths:
        for i, value in enumerate(space[text]):
            using = [c for c in out if c.settings[text] == value]
            if all(c.recipe is None for c in using):
                where = f"search.sensitivity.keep_int8[{i}]" if text == SENSITIVE else f"search.space[{text!r}][{i}]"
                raise RecipeError(f"{source}: {where} ({json.dumps(value)}): no candidate with "
                                  f"this value is a valid recipe: {using[0].invalid}")
    return out
