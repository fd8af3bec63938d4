"""Make plain ``mergekit-yaml`` know ``slerp_for_causal_lm`` without any user import.

mergekit reads no entry points, so ``slerp_plugin_mergekit.pth`` (installed into site-packages
with the package) calls :func:`install`, which puts a finder on ``sys.meta_path``. The finder
imports nothing itself: only when ``mergekit.merge_methods`` has been imported does it register
the method, and when ``mergekit.merge`` / ``mergekit.scripts.run_yaml`` load it adds our manifest
and model card to their ``run_merge``. Processes that never import mergekit import neither torch
nor mergekit. ``SLERP_PLUGIN_MERGEKIT_HOOK=0`` turns the hook off.

``slerp_plugin.integrations.mergekit.hook.main(["install"])`` (or ``uninstall``, ``status``) manages the
``.pth`` by hand (editable installs do not carry it).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import sysconfig
from pathlib import Path

ENV_VAR = "SLERP_PLUGIN_MERGEKIT_HOOK"
PTH_NAME = "slerp_plugin_mergekit.pth"
PTH_LINE = "import slerp_plugin.integrations.mergekit.hook as _slerp_hook; _slerp_hook.install()\n"


def _on_methods() -> None:
    from .method import register

    register()


def _on_merge() -> None:
    from .run import patch_mergekit

    patch_mergekit(import_merge=False)


_WATCHED = {
    "mergekit.merge_methods": _on_methods,
    "mergekit.merge": _on_merge,
    "mergekit.scripts.run_yaml": _on_merge,
}


def _run(name: str) -> None:
    try:
        _WATCHED[name]()
    except Exception as e:  # never break mergekit itself
        print(f"slerp_plugin: mergekit hook failed after importing {name}: {e}", file=sys.stderr)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run(self._name)

    def __getattr__(self, attr: str):
        return getattr(self._loader, attr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and not isinstance(spec.loader, _Loader):
            spec.loader = _Loader(spec.loader, fullname)
        return spec


def installed() -> bool:
    """True when the finder is active in this process."""
    return any(isinstance(f, _Finder) for f in sys.meta_path)


def install() -> None:
    """Activate the hook (no-op when ``SLERP_PLUGIN_MERGEKIT_HOOK=0`` or already active)."""
    if os.environ.get(ENV_VAR, "1") == "0" or installed():
        return
    sys.meta_path.insert(0, _Finder())
    for name in _WATCHED:
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False) is False:
            _run(name)


def pth_path() -> Path:
    """Where the ``.pth`` file lives for this interpreter (site-packages)."""
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    """``install``/``uninstall``/``status`` of the ``.pth`` for this interpreter."""
    cmd = (argv if argv is not None else sys.argv[1:] or ["status"])[0]
    path = pth_path()
    if cmd == "install":
        path.write_text(PTH_LINE)
        print(f"installed {path}")
    elif cmd == "uninstall":
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    elif cmd == "status":
        print(f"{path}: {'present' if path.is_file() else 'absent'}; "
              f"{ENV_VAR}={os.environ.get(ENV_VAR, '1')}")
    else:
        print("usage: python -m slerp_plugin.integrations.mergekit.hook install|uninstall|status",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
