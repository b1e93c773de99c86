"""The Slurm launch files (recipes/slurm/), run with stand-ins for Slurm's commands that record what they are asked."""

import os
import subprocess

import pytest

from .conftest import REPO


def fake_slurm(folder, nodes: list[str]) -> dict:
    """PATH with `scontrol` listing `nodes` and `srun` writing its arguments to $SRUN_LOG; the job's environment."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(nodes) + "\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SRUN_LOG": str(folder / "srun.txt"),
        "SLURM_JOB_NODELIST": "ignored-by-the-stand-in",
        "SLURM_JOB_NUM_NODES": str(len(nodes)),
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_ID": "4242",
    }


def test_a_stage_runs_as_one_torchrun_per_node_meeting_at_the_first_node(tmp_path):
    env = fake_slurm(tmp_path, ["gpu-a", "gpu-b"])
    argv = ["stages.pretrain", "--config", "recipes/km.yaml", "--deepspeed", "recipes/deepspeed/zero3.json"]
    subprocess.run(["bash", "recipes/slurm/train.sbatch", *argv], cwd=REPO, env=env, check=True)
    assert (tmp_path / "srun.txt").read_text().split("\n")[:-1] == [
        "--kill-on-bad-exit=1",
        ".venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "8",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "gpu-a:29500",
        "--rdzv_id",
        "4242",
        "-m",
        *argv,
    ]


def test_a_launch_without_a_stage_says_how_to_call_it(tmp_path):
    result = subprocess.run(
        ["bash", "recipes/slurm/train.sbatch"], cwd=REPO, env=fake_slurm(tmp_path, ["gpu-a"]), capture_output=True
    )
    assert result.returncode == 2 and b"usage: sbatch" in result.stderr
    assert not (tmp_path / "srun.txt").exists()


@pytest.mark.parametrize("script", sorted(path.name for path in (REPO / "recipes/slurm").glob("*.sbatch")))
def test_every_launch_file_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(REPO / "recipes/slurm" / script)], check=True)
