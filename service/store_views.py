"""Store models served by the engine that is loaded: every model of the store (service/store.py)
whose weights are the loaded weights is a *view* of that engine — its own name, its
Modelfile's system prompt, parameters and template the defaults of its requests — the way
`ollama create pirate` over a loaded model answers at once. A store model of other weights is
refused with a clear error: this server runs one set of weights (start another for it)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidArgumentError, NotFoundError
from service.model_defaults import template_renderer
from service.modelfile import Modelfile, parse
from service.store import ModelStore, content_digest, full_name


@dataclass(slots=True)
class View:
    name: str                      # as requests name it (`:latest` left out)
    modelfile: Modelfile
    template: Callable[[list[dict[str, str]]], str] | None
    modified_at: float


def _short(name: str) -> str:
    return name.removesuffix(":latest")


class StoreViews:
    def __init__(self, store: ModelStore, weights: Path, served_name: str) -> None:
        self.store = store
        self.weights = weights.resolve()
        self.served = full_name(served_name) if ":" in served_name else f"{served_name}:latest"
        self._cache: dict[str, View] = {}
        self._digest: str | None = None      # the loaded weights' content hash, when first needed

    def _same_weights(self, weights: str) -> bool:
        """The same file or directory, or the same content (a GGUF imported into the blobs)."""
        path = Path(weights).resolve()
        if path == self.weights:
            return True
        if path.is_file() != self.weights.is_file() or not path.exists():
            return False
        if self._digest is None:
            self._digest = content_digest(self.weights)
        return content_digest(path) == self._digest

    def get(self, name: str) -> View | None:
        """The view `name` (name or name:tag) names; None when the store has no such model;
        InvalidArgumentError for a store model of other weights."""
        try:
            m = self.store.get(name)
        except (NotFoundError, InvalidArgumentError):
            return None
        if not self._same_weights(m.weights):
            raise InvalidArgumentError("model", f"{m.name!r} is in the store, but runs on other weights than this "
                                       f"server has loaded ({m.weights}); serve it with `weft serve --model {m.name}`")
        view = self._cache.get(m.name)
        if view is None or view.modified_at != m.modified_at:
            mf = m.modelfile()
            view = View(_short(m.name), mf, template_renderer(mf.template) if mf.template else None, m.modified_at)
            self._cache[m.name] = view
        return view

    def names(self) -> list[str]:
        """Every store model this engine serves."""
        return [_short(m.name) for m in self.store.list() if self._same_weights(m.weights)]

    def create(self, name: str, modelfile: str) -> tuple[str, bool]:
        """Add a model from Modelfile text (paths are the server's); (its name, served here)."""
        m = self.store.create(name, parse(modelfile))
        return _short(m.name), self._same_weights(m.weights)

    def delete(self, name: str) -> None:
        if full_name(name) == self.served:
            raise InvalidArgumentError("name", f"{name!r} is the model this server was started with: it is in use")
        self.store.delete(name)
        self._cache.pop(full_name(name), None)

    def copy(self, source: str, destination: str) -> None:
        self.store.copy(source, destination)
