import os

from setuptools import setup
from setuptools.command.build_py import build_py

# What an installed btcfeed needs besides its code to run the stack: `btcfeed up` renders its
# supervisord configuration from these copies (common/commands/stack.py). The checkout keeps the one
# source of each where operators use it; the build copies them into the package (MANIFEST.in puts them
# in the sdist).
STACK_FILES = {"supervisord.conf": "supervisord.conf",
               os.path.join("deployment", "redis-local.conf"): "redis-local.conf"}


class BuildPyWithStackFiles(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "btcfeed", "commands", "stack-files")
        self.mkpath(target)
        for source, name in STACK_FILES.items():
            self.copy_file(source, os.path.join(target, name))

    def get_outputs(self, include_bytecode=True):
        target = os.path.join(self.build_lib, "btcfeed", "commands", "stack-files")
        return super().get_outputs(include_bytecode) + [os.path.join(target, name)
                                                          for name in STACK_FILES.values()]


setup(cmdclass={"build_py": BuildPyWithStackFiles})
