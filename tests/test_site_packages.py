"""The site_packages source: installed distributions' .py files, tagged and filtered by license."""

from __future__ import annotations

import email
from pathlib import Path

import pytest

from tisslm.core.config import DirSource, IngestParams, SitePackagesSource, load_params
from tisslm.core.errors import ConfigError
from tisslm.data.ingest import (
    ingest,
    installed_distributions,
    license_allowed,
    normalize_license,
    site_packages_files,
)
from tisslm.release.card import datasheet

GOOD = "def add(a, b):\n    return a + b\n"


def fake_distribution(site: Path, name: str, version: str, headers: list[str], files: dict[str, bytes]) -> None:
    """A *.dist-info directory (METADATA, RECORD) and the files its RECORD lists, under `site`."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "\n".join(["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}", *headers])
    )
    record = [f"{path},," for path in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    for path, data in files.items():
        target = site / path
        if not path.startswith(".."):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site-packages"
    fake_distribution(
        root, "alpha", "1.0", ["License-Expression: MIT"],
        {
            "alpha/__init__.py": GOOD.encode(),
            "alpha/core.py": ("# ✓\n" + GOOD).encode(),
            "alpha/latin1.py": "café = 1\n".encode("latin-1"),  # allowed, but skipped as not_utf8
            "alpha/tests/test_core.py": GOOD.encode(),  # a test: not seen by default
            "alpha/data.txt": b"not python\n",  # not .py: not seen
            "../../../bin/alpha-cli.py": b"",  # outside the site directory: not seen
        },
    )  # fmt: skip
    fake_distribution(
        root, "beta", "2.0", ["Classifier: License :: OSI Approved :: GNU General Public License v3 (GPLv3)"],
        {"beta/__init__.py": GOOD.encode(), "beta/mod.py": GOOD.encode(), "shared/common.py": GOOD.encode()},
    )  # fmt: skip
    fake_distribution(
        root, "gamma", "0.1", ["License: BSD"],
        {"gamma.py": GOOD.encode(), "shared/common.py": GOOD.encode()},  # shared/common.py: beta's, listed first
    )  # fmt: skip
    fake_distribution(root, "delta", "3", [], {"delta.py": GOOD.encode()})  # no license at all: "unknown"
    return root


def test_only_allowed_licenses_are_kept_and_excluded_files_are_counted_per_license(site):
    source = SitePackagesSource(type="site_packages", licenses=["MIT", "BSD"], paths=[site])
    table, report = ingest(IngestParams(sources=[source]))
    assert table["path"] == ["alpha==1.0/alpha/__init__.py", "alpha==1.0/alpha/core.py", "gamma==0.1/gamma.py"]
    assert set(table["source"]) == {"site-packages"}
    assert report.skipped == {"license_excluded": 4, "not_utf8": 1}
    assert report.seen == report.kept + sum(report.skipped.values()) == 8
    assert report.skipped_examples["license_excluded"][0] == "site-packages:beta==2.0/beta/__init__.py"
    licenses = report.to_json()["licenses"]
    assert {name: (v["included"], v["excluded"], v["skipped"]) for name, v in licenses.items()} == {
        "BSD": (1, 0, 0),
        "GPL-3.0-only": (0, 3, 0),
        "MIT": (2, 0, 1),
        "unknown": (0, 1, 0),
    }
    assert licenses["GPL-3.0-only"]["distributions"] == ["beta==2.0"]
    assert licenses["GPL-3.0-only"]["excluded_bytes"] == 3 * len(GOOD)
    assert licenses["MIT"]["included_bytes"] == sum(table["n_bytes"][:2])
    description = report.by_source["site-packages"]["description"]
    assert "the .py files of the 4 installed distributions" in description and "MIT, BSD" in description


def test_a_file_listed_twice_belongs_to_the_first_distribution_and_the_order_is_deterministic(site):
    files = site_packages_files(["MIT"], paths=[site])
    displays = [f.display for f in files]
    assert displays == sorted(displays) == [f.display for f in site_packages_files(["MIT"], paths=[site])]
    assert [d for d in displays if d.endswith("shared/common.py")] == ["beta==2.0/shared/common.py"]
    assert all(f.path.is_relative_to(site) for f in files)
    with_tests = [f.display for f in site_packages_files(["MIT"], paths=[site], exclude_tests=False)]
    assert set(with_tests) - set(displays) == {"alpha==1.0/alpha/tests/test_core.py"}


def test_a_distribution_found_again_under_a_later_path_is_shadowed(site, tmp_path):
    later = tmp_path / "later"
    fake_distribution(later, "alpha", "0.9", ["License-Expression: MIT"], {"alpha/old.py": GOOD.encode()})
    fake_distribution(later, "epsilon", "1", ["License-Expression: MIT"], {"epsilon.py": GOOD.encode()})
    names = [f"{d.metadata['Name']}=={d.version}" for d in installed_distributions([site, later])]
    assert names == ["alpha==1.0", "beta==2.0", "delta==3", "gamma==0.1", "epsilon==1"]
    displays = [f.display for f in site_packages_files(["MIT"], paths=[site, later])]
    assert "epsilon==1/epsilon.py" in displays and not any(d.startswith("alpha==0.9") for d in displays)


@pytest.mark.parametrize(
    "headers, expected",
    [
        (["License-Expression: Apache-2.0  OR MIT", "License: BSD", "Classifier: License :: OSI Approved :: MIT License"],
         "Apache-2.0 OR MIT"),
        (["Classifier: License :: OSI Approved :: Apache Software License", "License: MIT"], "Apache-2.0"),
        (["Classifier: License :: OSI Approved :: BSD License", "Classifier: License :: OSI Approved :: MIT License"],
         "BSD AND MIT"),
        (["Classifier: License :: OSI Approved", "License: Apache License, Version 2.0"], "Apache-2.0"),
        (["License: BSD 3-Clause License\n        \n        Copyright (c) 2021, someone"], "BSD-3-Clause"),
        (["License: Copyright (c) 2001 someone, all rights reserved.\n        Redistribution..."], "unknown"),
        (["License: GPLv2 with linking exception"], "GPLv2 with linking exception"),
        (["License: UNKNOWN"], "unknown"),
        ([], "unknown"),
    ],
)  # fmt: skip
def test_a_distribution_license_is_normalised_to_one_name(headers, expected):
    metadata = email.message_from_string("\n".join(["Name: x", "Version: 1", *headers]) + "\n\n")
    assert normalize_license(metadata) == expected


@pytest.mark.parametrize(
    "license, allowed, expected",
    [
        ("mit", ["MIT"], True),
        ("MIT OR GPL-3.0-only", ["MIT"], True),
        ("MIT AND GPL-3.0-only", ["MIT"], False),
        ("MPL-2.0 AND (Apache-2.0 OR MIT)", ["MIT"], False),
        ("MPL-2.0 AND (Apache-2.0 OR MIT)", ["MIT", "MPL-2.0"], True),
        ("Apache-2.0 WITH LLVM-exception", ["Apache-2.0"], True),
        ("GPLv2 with linking exception", ["GPLv2"], True),  # license-expression reads `with` as WITH
        ("GPLv2 with linking exception", ["MIT"], False),
        ("Zope Public License", ["Zope Public License"], True),
        ("(MIT", ["MIT"], False),
        ("unknown", SitePackagesSource(type="site_packages").licenses, False),
    ],
)
def test_the_allow_list_is_read_as_spdx_expressions(license, allowed, expected):
    assert license_allowed(license, allowed) is expected


def test_the_licenses_report_and_datasheet_table_appear_only_for_site_packages(site, tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text(GOOD)
    _, plain = ingest(IngestParams(sources=[DirSource(type="dir", path=tmp_path / "code")]))
    assert "licenses" not in plain.to_json()
    _, report = ingest(IngestParams(sources=[SitePackagesSource(type="site_packages", licenses=["MIT"], paths=[site])]))
    clean = {"docs_out": 2, "bytes_out": 100, "dropped": {}, "redactions": {}, "dropped_total": 0}
    clean["near_duplicate_clusters"] = 0
    without = datasheet({"ingest": plain.to_json(), "clean": clean})
    with_licenses = datasheet({"ingest": report.to_json(), "clean": clean})
    assert "license" not in without
    assert "Included: MIT. Excluded: BSD, GPL-3.0-only, unknown." in with_licenses
    assert "| GPL-3.0-only | 1 | 0 | 0.0 | 3 | 0.0 |" in with_licenses


def test_params_yaml_validates_the_source(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("ingest:\n  sources:\n    - {type: site_packages, licenses: [MIT, BSD-3-Clause]}\n")
    source = load_params(path).ingest.sources[0]
    assert isinstance(source, SitePackagesSource) and source.licenses == ["MIT", "BSD-3-Clause"]
    assert source.exclude_tests and source.paths is None
    assert "Apache-2.0" in SitePackagesSource(type="site_packages").licenses  # the permissive default
    path.write_text("ingest:\n  sources:\n    - {type: site_packages, licenses: MIT}\n")
    with pytest.raises(ConfigError, match="licenses"):
        load_params(path)
    path.write_text("ingest:\n  sources:\n    - {type: site_packages, licenses: []}\n")
    with pytest.raises(ConfigError, match="licenses"):
        load_params(path)


def test_the_real_environment_lists_its_distributions_files():
    distributions = installed_distributions()
    files = site_packages_files(SitePackagesSource(type="site_packages").licenses)  # listed, not read
    assert len(distributions) > 10 and len(files) > 1000
    assert any(f.display.startswith("pydantic==") and f.allowed for f in files)
    assert all("==" in f.display.split("/", 1)[0] and f.display.endswith(".py") for f in files[:100])
    assert len({f.path for f in files}) == len(files)
