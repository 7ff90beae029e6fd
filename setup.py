"""The C part of nonstop (the rest is in pyproject.toml): the TCP_REPAIR restore steps,
src/nonstop/session/_repair.c. Optional: without a compiler the install goes on and
nonstop.session.repair makes the same calls from Python (slower, same result)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nonstop.session._repair",
            sources=["src/nonstop/session/_repair.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
