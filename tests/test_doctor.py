"""The environment check: each problem found comes with a remedy; failures exit non-zero."""

from __future__ import annotations

import os
import subprocess
import sys

from jaxinfer import doctor


def test_matching_versions_pass():
    check = doctor.check_versions({"jax": "0.10.2", "jaxlib": "0.10.2",
                                   "jax-cuda13-plugin": "0.10.2"})
    assert check.status == doctor.OK


def test_jax_and_jaxlib_of_different_releases_fail_with_a_reinstall_command():
    check = doctor.check_versions({"jax": "0.10.2", "jaxlib": "0.9.0"})
    assert check.status == doctor.FAIL
    assert "jax 0.10.2 and jaxlib 0.9.0 differ" in check.remedy
    assert "pip install 'jax==0.10.2' 'jaxlib==0.10.2'" in check.remedy


def test_cuda_plugin_of_another_release_fails():
    check = doctor.check_versions({"jax": "0.10.2", "jaxlib": "0.10.2",
                                   "jax-cuda13-plugin": "0.9.1"})
    assert check.status == doctor.FAIL
    assert "jax-cuda13-plugin 0.9.1 does not match jaxlib 0.10.2" in check.remedy


def test_driver_older_than_the_cuda_major_version_fails():
    check = doctor.check_cuda(runtime=13000, driver_cuda=12080, driver="550.54.15")
    assert check.status == doctor.FAIL
    assert "CUDA runtime 13.0, driver supports CUDA 12.8 (driver 550.54.15)" in check.detail
    assert ">= 580.65.06" in check.remedy


def test_driver_of_an_older_minor_version_warns():
    check = doctor.check_cuda(runtime=12080, driver_cuda=12040)
    assert check.status == doctor.WARN and "minor-version compatibility" in check.remedy


def test_driver_newer_than_the_runtime_passes():
    assert doctor.check_cuda(runtime=12040, driver_cuda=12080).status == doctor.OK


def test_unwritable_compilation_cache_fails_with_a_remedy(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    check = doctor.check_compilation_cache(blocker / "xla")
    assert check.status == doctor.FAIL
    assert "XDG_CACHE_HOME" in check.remedy


def test_writable_compilation_cache_passes(tmp_path):
    assert doctor.check_compilation_cache(tmp_path / "xla").status == doctor.OK


def test_a_check_that_crashes_is_reported_as_failed():
    def check_broken():
        raise RuntimeError("boom")

    (result,) = doctor.run_checks([check_broken])
    assert result.status == doctor.FAIL and "RuntimeError: boom" in result.detail


def test_this_machine_sees_its_devices():
    check = doctor.check_devices()
    assert check.status == doctor.OK and "device(s)" in check.detail


def run_doctor(**env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxinfer.launch.doctor"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_launcher_exits_non_zero_and_prints_the_remedy_when_a_check_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    run = run_doctor(XDG_CACHE_HOME=str(blocker))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "[FAIL] compilation cache" in run.stdout
    assert "-> point XDG_CACHE_HOME" in run.stdout
    assert "[OK  ] versions" in run.stdout and "[OK  ] devices" in run.stdout
    assert "1 check(s) failed: compilation cache" in run.stdout


def test_launcher_exits_zero_when_every_check_passes(tmp_path):
    run = run_doctor(XDG_CACHE_HOME=str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
