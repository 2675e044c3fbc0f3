"""The model registry: immutable versions of one model and the aliases that choose between them.

Layout (a plain folder, local disk or shared storage; no server)::

    <root>/<name>/
        aliases.json           {"aliases": {"champion": "v3", "challenger": "v4"}, "champions": ["v1", "v3"]}
        history.jsonl          one line per register / promote / rollback / alias change: who, when, why
        versions/v4/entry.json what the version is: source bundle, model version, data, training metrics,
                               offline evaluations (keyed by data and window, for the promotion gate)
        versions/v4/bundle/    a verified copy of the bundle written by ``finrec train``

Versions are numbered ``v1, v2, ...`` and never change once registered (their
evaluations aside, which only grow). Aliases are pointers, not stages (as in
MLflow's and BentoML's newer registries): ``champion`` serves outside
experiments, ``challenger`` is the candidate. ``champions`` is the stack of
past champions, so a rollback knows where to go back to.

Writers take an exclusive ``flock`` on ``<root>/<name>/.lock`` (advisory: fine
on a local disk and on NFSv4; not on object stores); readers never lock, since
``aliases.json`` and ``entry.json`` are replaced with one ``os.replace`` and a
reader sees the old file or the new one, never a torn one. A version being
copied in lives in a temporary folder and is deleted on any error, so a
half-written version is never visible.

Examples
--------
>>> import tempfile
>>> reg = ModelRegistry(Path(tempfile.mkdtemp()), "demo")
>>> reg.versions(), reg.resolve("champion")
([], None)
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finrec.artifacts import read_manifest, verify_files
from finrec.errors import ArtifactError, FinrecError
from finrec.registry.gate import GateResult, PromotionRefused, check_gate

if TYPE_CHECKING:  # pragma: no cover
    from finrec.config import FinrecSettings

CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = "aliases.json"
HISTORY = "history.jsonl"
ENTRY = "entry.json"
BUNDLE = "bundle"
_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class UnknownVersionError(FinrecError):
    """A version or alias that the registry does not hold."""


@dataclass(frozen=True)
class Promotion:
    """What a promotion did: the new champion, the one it replaced, and the gate's verdict (None: no gate ran)."""

    version: str
    previous: str | None
    forced: bool
    gate: GateResult | None


class ModelRegistry:
    """Versions of the model ``name`` under ``root``, with aliases, history, promotion gate and rollback.

    Parameters
    ----------
    root
        Registry folder; created on first write.
    name
        Name of the registered model (one folder per name).
    gate_metric, max_regression
        The promotion gate (see :func:`finrec.registry.gate.check_gate`).
    """

    def __init__(self, root: Path, name: str = "finrec", gate_metric: str = "auto",
                 max_regression: float = 0.0) -> None:  # fmt: skip
        self.root = Path(root)
        self.name = name
        self.gate_metric = gate_metric
        self.max_regression = max_regression
        self.home = self.root / name

    @classmethod
    def from_settings(cls, settings: FinrecSettings) -> ModelRegistry:
        r = settings.registry
        return cls(r.path(settings.workspace), r.name, r.gate_metric, r.max_regression)

    # -- reading ---------------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        folder = self.home / "versions"
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in folder.iterdir() if (m := _VERSION.match(p.name))
                 and (p / ENTRY).is_file()]  # fmt: skip
        return [name for _, name in sorted(found)]

    def aliases(self) -> dict[str, str]:
        """Alias -> version."""
        return dict(self._state()["aliases"])

    def champions(self) -> list[str]:
        """Past and present champions, the present one last."""
        return list(self._state()["champions"])

    def resolve(self, ref: str) -> str | None:
        """The version ``ref`` names (an alias or a version), or None."""
        aliases = self.aliases()
        if ref in aliases:
            return aliases[ref]
        return ref if _VERSION.match(ref) and (self.home / "versions" / ref / ENTRY).is_file() else None

    def require(self, ref: str) -> str:
        """Like :meth:`resolve`, but an unknown reference raises :class:`UnknownVersionError`."""
        version = self.resolve(ref)
        if version is None:
            known = self.versions()
            raise UnknownVersionError(
                f"the registry {self.home} has no version or alias {ref!r}",
                hint=f"versions: {', '.join(known) or 'none'}; aliases: {self.aliases() or 'none'}; "
                "register a bundle with `finrec registry register BUNDLE`",
            )
        return version

    def path(self, version: str) -> Path:
        """The bundle folder of ``version``."""
        return self.home / "versions" / version / BUNDLE

    def entry(self, ref: str) -> dict[str, Any]:
        """What the registry knows of a version (see the module docstring)."""
        version = self.require(ref)
        try:
            entry: dict[str, Any] = json.loads((self.home / "versions" / version / ENTRY).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"registry entry of {version} cannot be read: {exc}",
                                hint=f"restore {self.home / 'versions' / version} from a backup") from None
        entry["aliases"] = sorted(a for a, v in self.aliases().items() if v == version)
        return entry

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The registry's history, oldest first (the last ``limit`` records)."""
        path = self.home / HISTORY
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash; the state itself lives in aliases.json
        return records[-limit:] if limit else records

    # -- writing ---------------------------------------------------------------------------------------
    def register(self, bundle: Path, *, alias: str | None = CHALLENGER, by: str = "", reason: str = "",
                 evaluations: dict[str, Any] | None = None) -> str:  # fmt: skip
        """Copy a verified bundle in as the next version and point ``alias`` at it; returns the version.

        The bundle is checked against its manifest (every file's size and checksum) before and after the copy.
        """
        bundle = Path(bundle)
        manifest = read_manifest(bundle, "model")
        verify_files(bundle, manifest)
        if alias is not None:
            _check_alias(alias)
        with self._locked():
            taken = [int(v[1:]) for v in self.versions()]
            version = f"v{max(taken, default=0) + 1}"
            final = self.home / "versions" / version
            tmp = self.home / "versions" / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                shutil.copytree(bundle, tmp / BUNDLE)
                verify_files(tmp / BUNDLE, manifest)
                entry = {
                    "version": version,
                    "name": self.name,
                    "model_version": manifest.get("metrics", {}).get("model_version"),
                    "registered_at": _now(),
                    "registered_by": by,
                    "reason": reason,
                    "source": str(bundle.resolve()),
                    "created_at": manifest.get("created_at"),
                    "code_version": manifest.get("code_version"),
                    "data": manifest.get("inputs", {}),
                    "split": manifest.get("config", {}).get("split"),
                    "training": manifest.get("metrics", {}).get("training", {}),
                    "fallbacks": manifest.get("metrics", {}).get("fallbacks", []),
                    "evaluations": dict(evaluations or {}),
                }
                _write_json(tmp / ENTRY, entry)
                tmp.rename(final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._log("register", version=version, by=by, reason=reason, source=entry["source"])
            if alias is not None:
                self._set_alias(alias, version, by, reason)
        return version

    def add_evaluation(self, ref: str, key: str, evaluation: dict[str, Any]) -> None:
        """Record an offline evaluation of a version under ``key`` (data fingerprint and window)."""
        version = self.require(ref)
        path = self.home / "versions" / version / ENTRY
        with self._locked():
            entry = json.loads(path.read_text())
            entry.setdefault("evaluations", {})[key] = evaluation
            _write_json(path, entry)

    def set_alias(self, alias: str, ref: str, by: str = "", reason: str = "") -> str:
        """Point ``alias`` at a version (not ``champion``: that goes through :meth:`promote` and the gate)."""
        _check_alias(alias)
        if alias == CHAMPION:
            raise FinrecError("the champion alias moves only by promotion or rollback",
                              hint="use `finrec registry promote VERSION` (through the gate) or `rollback`")
        with self._locked():
            version = self.require(ref)
            self._set_alias(alias, version, by, reason)
        return version

    def promote(self, ref: str = CHALLENGER, *, force: bool = False, reason: str = "", by: str = "") -> Promotion:
        """Make ``ref`` the champion if the gate lets it (or ``force``); the challenger alias is then cleared.

        Raises
        ------
        PromotionRefused
            The challenger is worse than the champion on the gate metric beyond the tolerance, or there is no
            evaluation of both on the same data and window; the message says by how much or what to run.
        """
        with self._locked():
            version = self.require(ref)
            state = self._state()
            previous = state["aliases"].get(CHAMPION)
            if previous == version:
                raise FinrecError(f"{version} is already the champion", hint="nothing to promote")
            gate = None
            if previous is not None:
                gate = check_gate(self.entry(version), self.entry(previous), self.gate_metric, self.max_regression)
                if not gate.passed and not force:
                    self._log("promotion_refused", version=version, champion=previous, by=by, reason=reason,
                              gate=gate.to_dict())  # fmt: skip
                    raise PromotionRefused(gate)
            state["aliases"][CHAMPION] = version
            if state["aliases"].get(CHALLENGER) == version:
                del state["aliases"][CHALLENGER]
            state["champions"].append(version)
            self._save_state(state)
            forced = bool(force and gate is not None and not gate.passed)
            self._log("promote", version=version, previous=previous, forced=forced, by=by, reason=reason,
                      gate=None if gate is None else gate.to_dict())  # fmt: skip
        return Promotion(version, previous, forced, gate)

    def rollback(self, to: str | None = None, *, reason: str = "", by: str = "") -> dict[str, Any]:
        """Point the champion back at the previous champion (or at ``to``); no gate: this is the way back.

        Returns the history record (``version``: the champion now, ``previous``: the one rolled back).
        """
        with self._locked():
            state = self._state()
            current = state["aliases"].get(CHAMPION)
            if current is None:
                raise FinrecError("there is no champion to roll back", hint="promote a version first")
            stack = state["champions"]
            if to is None:
                earlier = [v for v in stack[:-1] if v != current]
                if not earlier:
                    raise FinrecError(f"{current} is the only champion there has been: nothing to roll back to",
                                      hint="promote another version instead")  # fmt: skip
                target = earlier[-1]
                while stack and stack[-1] != target:
                    stack.pop()
            else:
                target = self.require(to)
                if target == current:
                    raise FinrecError(f"{target} is already the champion", hint="nothing to roll back")
                if target in stack:
                    del stack[len(stack) - stack[::-1].index(target):]
                else:
                    stack.append(target)
            state["aliases"][CHAMPION] = target
            self._save_state(state)
            return self._log("rollback", version=target, previous=current, by=by, reason=reason)

    # -- internals -------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        path = self.home / ALIASES
        if not path.is_file():
            return {"aliases": {}, "champions": []}
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            hint = "restore it from history.jsonl (its last promote/rollback records)"
            raise ArtifactError(f"{path} cannot be read: {exc}", hint=hint) from None
        state.setdefault("aliases", {})
        state.setdefault("champions", [])
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        state["updated_at"] = _now()
        _write_json(self.home / ALIASES, state)

    def _set_alias(self, alias: str, version: str, by: str, reason: str) -> None:
        state = self._state()
        previous = state["aliases"].get(alias)
        state["aliases"][alias] = version
        self._save_state(state)
        self._log("alias", alias=alias, version=version, previous=previous, by=by, reason=reason)

    def _log(self, action: str, **fields: Any) -> dict[str, Any]:
        record = {"time": _now(), "ts": round(time.time(), 3), "action": action, **fields}
        with open(self.home / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    @contextmanager
    def _locked(self) -> Iterator[None]:
        (self.home / "versions").mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _check_alias(alias: str) -> None:
    if not _ALIAS.match(alias) or _VERSION.match(alias):
        raise FinrecError(f"alias {alias!r} is not valid",
                          hint="lower-case letters, digits, - and _, starting with a letter, not of the form v<N>")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
