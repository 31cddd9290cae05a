"""The stage graph: nodes with named upstream edges, validated once when built."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from contract.params import StageParams
from contract.spec import is_dns1123_label
from pipeline.errors import ConfigError
from pipeline.resources import Resources


@dataclass(frozen=True)
class Stage:
    """One job of the DAG: what runs (`kind`), with what (`params`), after what (`upstream`)."""

    name: str
    kind: str
    params: StageParams  # the kind's model (contract.params.STAGE_PARAMS), validated
    # role -> upstream stage name; the stage reads that stage's output dir as `inputs[role]`.
    upstream: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    image: str = "cpu"
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def dependencies(self) -> list[str]:
        return sorted(set(self.upstream.values()))


class Graph:
    """A validated DAG of stages, iterated in a deterministic topological order."""

    def __init__(self, stages: list[Stage]) -> None:
        self._stages: dict[str, Stage] = {}
        for stage in stages:
            if not is_dns1123_label(stage.name):
                raise ConfigError(
                    f"stage name '{stage.name}' is not a DNS-1123 label "
                    "(lowercase letters, digits and '-', at most 63 characters)"
                )
            if stage.name in self._stages:
                raise ConfigError(f"duplicate stage name '{stage.name}'")
            self._stages[stage.name] = stage
        for stage in stages:
            for role, upstream in stage.upstream.items():
                if upstream not in self._stages:
                    raise ConfigError(
                        f"stage '{stage.name}': upstream '{role}' names unknown stage '{upstream}'"
                    )
        self._order = self._topological_order()

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def __contains__(self, name: str) -> bool:
        return name in self._stages

    def __iter__(self) -> Iterator[Stage]:
        return (self._stages[name] for name in self._order)

    def __len__(self) -> int:
        return len(self._stages)

    @property
    def names(self) -> list[str]:
        return list(self._order)

    def downstream(self, name: str) -> set[str]:
        """Every stage that depends on `name`, directly or not."""
        found: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for stage in self._stages.values():
                if current in stage.upstream.values() and stage.name not in found:
                    found.add(stage.name)
                    frontier.append(stage.name)
        return found

    def _topological_order(self) -> list[str]:
        remaining = {name: set(stage.dependencies) for name, stage in self._stages.items()}
        order: list[str] = []
        while remaining:
            ready = sorted(name for name, deps in remaining.items() if not deps)
            if not ready:
                cycle = _find_cycle(remaining)
                raise ConfigError(f"dependency cycle: {' -> '.join(cycle)}")
            for name in ready:
                order.append(name)
                del remaining[name]
            for deps in remaining.values():
                deps.difference_update(ready)
        return order


def _find_cycle(remaining: dict[str, set[str]]) -> list[str]:
    """Walk upstream edges from any blocked stage until a name repeats."""
    path: list[str] = []
    current = min(remaining)
    while current not in path:
        path.append(current)
        current = min(remaining[current])
    return path[path.index(current) :] + [current]
