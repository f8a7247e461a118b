"""A PEP 517 build backend for the fajit package, standard library only.

fajit is pure Python, so a wheel is a zip of fajit/*.py plus the dist-info
files. Keeping the backend in-tree (no setuptools to fetch into pip's isolated
build environment) lets `pip install ./python` work without a network.
Hooks: build_wheel, build_sdist, build_editable (a .pth file pointing here).
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "fajit"
TAG = "py3-none-any"


def _project():
    """The [project] table's simple fields, read from pyproject.toml."""
    path = os.path.join(ROOT, "pyproject.toml")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        import tomllib
    except ImportError:  # Python < 3.11: the few "key = \"value\"" lines we need
        fields, section = {}, None
        for line in raw.decode().splitlines():
            m = re.match(r"\s*\[(.*)\]\s*$", line)
            if m:
                section = m.group(1).strip()
                continue
            m = re.match(r'\s*([\w-]+)\s*=\s*"(.*)"\s*$', line)
            if m and section == "project":
                fields[m.group(1)] = m.group(2)
        return fields
    return tomllib.loads(raw.decode())["project"]


def _metadata():
    p = _project()
    lines = [
        "Metadata-Version: 2.1",
        "Name: %s" % p["name"],
        "Version: %s" % p["version"],
        "Summary: %s" % p.get("description", ""),
        "Requires-Python: %s" % p.get("requires-python", ">=3.8"),
    ]
    for c in p.get("classifiers", []):
        lines.append("Classifier: %s" % c)
    for extra, reqs in sorted(p.get("optional-dependencies", {}).items()):
        lines.append("Provides-Extra: %s" % extra)
        for r in reqs:
            lines.append('Requires-Dist: %s; extra == "%s"' % (r, extra))
    readme = os.path.join(ROOT, "README.md")
    text = "\n".join(lines) + "\n"
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            text += "Description-Content-Type: text/markdown\n\n" + f.read()
    return p["name"], p["version"], text


def _package_files():
    pkg = os.path.join(ROOT, PACKAGE)
    out = []
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            out.append((os.path.join(pkg, name), "%s/%s" % (PACKAGE, name)))
    return out


class _Wheel:
    """A wheel being written: files plus the RECORD of their hashes."""

    def __init__(self, path, dist_info):
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)
        self.dist_info = dist_info
        self.record = []

    def add(self, arcname, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        self.zip.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        self.record.append("%s,sha256=%s,%d" % (arcname, digest, len(data)))

    def close(self, metadata):
        self.add(self.dist_info + "/METADATA", metadata)
        self.add(self.dist_info + "/WHEEL", "Wheel-Version: 1.0\nGenerator: fajit_build\n"
                 "Root-Is-Purelib: true\nTag: %s\n" % TAG)
        self.add(self.dist_info + "/top_level.txt", PACKAGE + "\n")
        record = "\n".join(self.record + [self.dist_info + "/RECORD,,"]) + "\n"
        self.zip.writestr(zipfile.ZipInfo(self.dist_info + "/RECORD",
                                          date_time=(2020, 1, 1, 0, 0, 0)), record)
        self.zip.close()


def _build(wheel_directory, editable):
    name, version, metadata = _metadata()
    filename = "%s-%s-%s.whl" % (name, version, TAG)
    wheel = _Wheel(os.path.join(wheel_directory, filename), "%s-%s.dist-info" % (name, version))
    if editable:
        wheel.add("_fajit_editable.pth", ROOT + "\n")
    else:
        for src, arcname in _package_files():
            with open(src, "rb") as f:
                wheel.add(arcname, f.read())
    wheel.close(metadata)
    return filename


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(wheel_directory, editable=False)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _build(wheel_directory, editable=True)


def build_sdist(sdist_directory, config_settings=None):
    name, version, metadata = _metadata()
    base = "%s-%s" % (name, version)
    filename = base + ".tar.gz"
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz") as tar:
        for sub in ("pyproject.toml", "README.md", PACKAGE, "build_backend", "tests"):
            path = os.path.join(ROOT, sub)
            if os.path.exists(path):
                tar.add(path, arcname="%s/%s" % (base, sub),
                        filter=lambda ti: None if "__pycache__" in ti.name else ti)
        data = metadata.encode("utf-8")
        info = tarfile.TarInfo("%s/PKG-INFO" % base)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return filename
