"""The `slurm:` config section: per-kind placement, cluster profiles, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.backends.slurm_settings import SlurmSettings
from pipeline.loader import load_config

REPO = Path(__file__).resolve().parents[3]


def test_stage_kind_overrides_win_and_extra_lines_add_up():
    settings = SlurmSettings(partition="gpu", account="llm", extra_sbatch=["--constraint=b200"],
                             stages={"preprocess": {"partition": "cpu", "extra_sbatch": ["--nice=10"]}})
    assert settings.placement("train").partition == "gpu"
    preprocess = settings.placement("preprocess")
    assert (preprocess.partition, preprocess.account) == ("cpu", "llm")
    assert preprocess.extra_sbatch == ["--constraint=b200", "--nice=10"]


def test_the_b200_profile_gives_defaults_and_fields_beside_it_win():
    settings = SlurmSettings.model_validate({"profile": "b200", "account": "my-team"})
    assert settings.account == "my-team"
    assert settings.partition == "batch"
    assert settings.container is not None
    assert settings.placement("train").exclusive is True
    assert settings.placement("preprocess").partition == "cpu"


@pytest.mark.parametrize(("fragment", "message"), [
    ({"profile": "no-such"}, "profile 'no-such': no file"),
    ({"stages": {"trian": {}}}, "unknown stage kind 'trian'"),
    ({"extra_sbatch": ["-p debug"]}, "'-p debug' is not one long sbatch option"),
    ({"partiton": "debug"}, "Extra inputs are not permitted"),
])
def test_bad_settings_name_what_is_wrong(fragment, message):
    with pytest.raises(ValidationError, match=message):
        SlurmSettings.model_validate(fragment)


def test_a_study_config_carries_its_slurm_section():
    loaded = load_config("smoke", ["slurm.partition=debug", "slurm.stages.train.qos=high"])
    assert loaded.config.slurm is not None
    assert loaded.config.slurm.placement("train").qos == "high"
    assert load_config("smoke").config.slurm is None


def test_strict_images_without_digest_are_refused_before_anything_is_submitted(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", "--cluster", "slurm", "-c", "smoke",
         "--root", str(tmp_path), "--set", "images.strict=true",
         # repositories that no lock file pins
         "--set", "images.refs.cpu=example.org/unpinned:1", "--set", "images.refs.train=example.org/t:1"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "has no @sha256: digest" in result.stderr
    assert list(tmp_path.iterdir()) == []
