"""Shared code names no provider: a third provider is one package plus one ``PROVIDERS`` line.

The rule, checked with ``ast`` on every module of shared code (everything under ``workers/``,
``producer/`` and ``config/`` except the providers' own packages ``workers/providers/<name>/``):

1. no import of a provider's package: ``moonbatch.workers.providers.<name>`` or anything under
   it, in any form (``import``, ``from ... import``, ``from moonbatch.workers.providers import
   <name>``), at module level or inside a function;
2. no string literal that *is* a provider's name (``"moondream"``, ``"fal"``): such a literal
   selects behaviour (``if provider == "fal"``, ``{"moondream": ...}``, a default, a metric
   label). Docstrings are prose and are not checked; longer strings that merely contain a name
   (``"fal-ai/moondream3-preview"`` in help text) are not names either.

Allowed: the registry itself (the ``PROVIDERS`` and ``DEFAULT_PROVIDER`` assignments of
``workers/providers/__init__.py``); nothing else, the CLI and the Python API included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from moonbatch.workers.providers import PROVIDERS

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("workers", "producer", "config", "moonbatch")
PACKAGE = "moonbatch.workers.providers"
REGISTRY = "workers/providers/__init__.py"
REGISTRY_NAMES = frozenset({"PROVIDERS", "DEFAULT_PROVIDER"})
#: Shared modules allowed to name providers for now, with the reason.
ALLOWED: dict[str, str] = {}


def package_of(name: str) -> str:
    """The package (folder under ``workers/providers/``) of provider ``name``, from its registry
    line: ``"moondream-realtime"`` → ``"realtime"`` (a provider's name need not be a Python
    identifier)."""
    module = PROVIDERS[name].partition(":")[0]
    assert module.startswith(PACKAGE + ".") and module.count(".") == PACKAGE.count(".") + 1, module
    return module.rsplit(".", 1)[1]


def shared_modules() -> list[str]:
    """Paths (relative to the checkout) of every shared module."""
    provider_dirs = {f"workers/providers/{package_of(name)}/" for name in PROVIDERS}
    found = []
    for top in SHARED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not any(rel.startswith(d) for d in provider_dirs):
                found.append(rel)
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    """``id``s of the string constants that are docstrings (module, class, function)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def _registry_nodes(tree: ast.AST) -> set[int]:
    """``id``s of every node inside the registry's own assignments."""
    ids = set()
    for node in getattr(tree, "body", ()):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id in REGISTRY_NAMES for t in targets):
            ids.update(id(n) for n in ast.walk(node))
    return ids


def violations(source: str, module: str, names: frozenset[str] | set[str]) -> list[str]:
    """Where ``source`` (the module ``module``, dotted) names a provider of ``names``: one
    ``line: what`` per finding (see the module docstring)."""
    tree = ast.parse(source)
    packages = {f"{PACKAGE}.{name}" for name in names}
    skip = _docstrings(tree) | (_registry_nodes(tree) if module == PACKAGE else set())
    found = []

    def provider_module(dotted: str) -> bool:
        return any(dotted == p or dotted.startswith(p + ".") for p in packages)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if provider_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                parts = module.split(".")[:-node.level]
                base = ".".join(parts + ([node.module] if node.module else []))
            if provider_module(base):
                found.append(f"{node.lineno}: from {base} import ...")
            else:
                found += [f"{node.lineno}: from {base} import {a.name}" for a in node.names
                          if provider_module(f"{base}.{a.name}")]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value in names:
            found.append(f"{node.lineno}: the string {node.value!r}")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def test_the_rule_catches_what_it_forbids():
    """The checker reports each kind of naming, and leaves prose and longer strings alone."""
    names = frozenset({"alpha", "beta"})
    source = '''"""Docstring naming alpha: "alpha"."""
import moonbatch.workers.providers.alpha.client
from moonbatch.workers.providers import beta, get_provider
from moonbatch.workers.providers.beta.settings import BetaSettings
from .alpha import thing


def f(provider):
    """Prose: 'beta'."""
    if provider == "alpha":
        return {"beta": 1}
    return "alpha-ai/model", "the beta service", get_provider(provider)
'''
    found = violations(source, "moonbatch.workers.providers.shared", names)
    assert found == [
        "2: import moonbatch.workers.providers.alpha.client",
        "3: from moonbatch.workers.providers import beta",
        "4: from moonbatch.workers.providers.beta.settings import ...",
        "5: from moonbatch.workers.providers.alpha import ...",
        "10: the string 'alpha'",
        "11: the string 'beta'",
    ]


def test_the_registry_may_name_its_providers_and_nothing_else_may():
    source = 'PROVIDERS = {"alpha": "x:Y"}\nDEFAULT_PROVIDER = "alpha"\nOTHER = "alpha"\n'
    assert violations(source, PACKAGE, {"alpha"}) == ["3: the string 'alpha'"]
    assert len(violations(source, "moonbatch.workers.other", {"alpha"})) == 3


@pytest.mark.parametrize("path", shared_modules())
def test_shared_code_names_no_provider(path):
    if path in ALLOWED:
        pytest.skip(f"{path}: allowed for now ({ALLOWED[path]})")
    parts = Path(path).with_suffix("").parts
    module = ".".join(("moonbatch", *(parts[:-1] if parts[-1] == "__init__" else parts)))
    found = violations((ROOT / path).read_text(), module, frozenset(PROVIDERS))
    assert not found, (f"{path} names a provider (shared code asks the provider through "
                       "moonbatch.workers.providers instead):\n  " + "\n  ".join(found))


def test_every_provider_is_one_package_and_one_registry_line():
    """Each registered provider is a package under workers/providers/ whose class is named in
    its registry line."""
    for name, target in PROVIDERS.items():
        package = package_of(name)
        assert (ROOT / "workers" / "providers" / package / "__init__.py").is_file(), name
        assert target.startswith(f"{PACKAGE}.{package}:"), target


def test_every_provider_answers_the_whole_interface():
    """What shared code asks (``Provider``'s members) every registered provider answers, and
    its text for the CLI is text: a third provider that forgets one fails here, not in a run."""
    from moonbatch.workers.models import RunSpec, SkillOptions
    from moonbatch.workers.providers import (
        DEFAULT_PROVIDER,
        Provider,
        Wording,
        get_provider,
        provider_of,
    )

    members = {n for n in vars(Provider) if not n.startswith("_")} | set(
        Provider.__annotations__)
    spec = RunSpec(run_id="r", input="s3://b/in/", output="s3://b/out/",
                   options=SkillOptions(skill="caption"), shard_size=10, max_shard_bytes=10**6,
                   created_at=0.0)
    for name in PROVIDERS:
        provider = get_provider(name)
        missing = sorted(m for m in members if not hasattr(provider, m))
        assert not missing, f"{name} lacks {missing}"
        assert provider.name == name and isinstance(provider.wording, Wording)
        done = provider.complete_spec(spec.model_copy(update={"provider": name}))
        provider.check_spec(done)
        limits = provider.limits(done)
        assert limits.item_bytes("a.jpg", 3000, 40) >= 4000 and limits.reason
        assert name in provider.describe(done.model_dump())
        assert isinstance(provider.upload_note({"upload_bytes": 0, "input": "s3://b/"}), str)
        assert provider.count_units([]) == 0
        assert provider.credential and provider.metric_actions
        assert provider_of({"provider": name}) is provider
    assert provider_of({}) is get_provider(DEFAULT_PROVIDER)  # runs from before providers
