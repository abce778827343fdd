"""The one compiled piece: ``_vitscale_jpeg`` (pipeline/_jpeg.c: region + DCT-scaled JPEG decode on
libjpeg-turbo), top-level for the reason pipeline/decode.py gives.

Everything else is declared in pyproject.toml. The extension links the system's libjpeg-turbo
(Debian/Ubuntu: ``libjpeg62-turbo-dev``; Fedora/RHEL: ``libjpeg-turbo-devel``; macOS: ``brew install
jpeg-turbo``); the container image installs it (infra/docker/Dockerfile).
"""

import os
import sysconfig
from pathlib import Path

from setuptools import Extension, setup


def _jpeg_dirs() -> tuple[list[str], list[str]]:
    prefixes = [p for p in (os.environ.get("JPEG_PREFIX"), "/usr", "/usr/local", "/opt/homebrew/opt/jpeg-turbo",
                            "/usr/local/opt/jpeg-turbo", sysconfig.get_config_var("prefix")) if p]
    for p in prefixes:
        if (Path(p) / "include" / "jpeglib.h").exists():
            return [str(Path(p) / "include")], [str(Path(p) / "lib")]
    raise SystemExit(
        "vitscale needs libjpeg-turbo's headers to build _vitscale_jpeg (pipeline/_jpeg.c, the loader's JPEG decoder): "
        "apt-get install libjpeg62-turbo-dev (Debian) / libjpeg-turbo8-dev (Ubuntu) / dnf install "
        "libjpeg-turbo-devel / brew install jpeg-turbo, or set JPEG_PREFIX to where include/jpeglib.h lives")


include, lib = _jpeg_dirs()
setup(ext_modules=[Extension("_vitscale_jpeg", ["pipeline/_jpeg.c"], include_dirs=include, library_dirs=lib,
                             libraries=["jpeg"], extra_compile_args=["-O2", "-Wall"])])
