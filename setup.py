"""Ships ``slerp_plugin_mergekit.pth`` at the root of the wheel (site-packages), so that an
installed slerp_plugin makes plain ``mergekit-yaml`` know ``slerp_for_causal_lm``.
Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "slerp_plugin_mergekit.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
