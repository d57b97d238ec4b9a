"""SLURM: the launch line as a pure function, the report merge, and the sbatch scripts on a real
local slurmd (slurm/local-cluster.sh). Training here uses vgg_weights=random: pretrained VGG
cannot be downloaded on these machines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artscale.errors import UserError
from artscale.slurm import accelerate_launch_command, gpus_on_node, main_port, merge_reports, node_launch_command


def test_launch_line_for_2_nodes_x_8_gpus():
    lines = [
        accelerate_launch_command(
            num_machines=2, machine_rank=rank, processes_per_machine=8, main_ip="gpu-node-017", main_port=29517,
            mixed_precision="bf16", script="launch/train.py", script_args=["--config", "big.yaml", "max_steps=10"],
        )
        for rank in (0, 1)
    ]
    for rank, (cmd, env) in enumerate(lines):
        assert env == {}
        assert cmd == [
            "accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "16",
            "--machine_rank", str(rank), "--main_process_ip", "gpu-node-017", "--main_process_port", "29517",
            "--rdzv_backend", "static", "--same_network", "--mixed_precision", "bf16", "--dynamo_backend", "no",
            "launch/train.py", "--config", "big.yaml", "max_steps=10",
        ]


def test_launch_line_single_gpu_and_cpu_ranks():
    cmd, env = accelerate_launch_command(num_machines=1, machine_rank=0, processes_per_machine=1, main_ip="x", main_port=1)
    assert cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" not in cmd and "--machine_rank" not in cmd and env == {}
    # accelerate 1.15: --cpu starts one process; CPU ranks are --multi_gpu with ACCELERATE_USE_CPU=1
    cmd, env = accelerate_launch_command(num_machines=2, machine_rank=1, processes_per_machine=1, main_ip="h", main_port=2,
                                         use_gpu=False)
    assert env == {"ACCELERATE_USE_CPU": "1"}
    assert "--cpu" not in cmd and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--machine_rank") + 1] == "1"
    cmd, env = accelerate_launch_command(num_machines=1, machine_rank=0, processes_per_machine=1, main_ip="h", main_port=2,
                                         use_gpu=False)
    assert "--cpu" in cmd and "--multi_gpu" not in cmd and env == {"ACCELERATE_USE_CPU": "1"}


def test_launch_line_refuses_bad_ranks():
    with pytest.raises(UserError, match="outside 0..1"):
        accelerate_launch_command(num_machines=2, machine_rank=2, processes_per_machine=8, main_ip="h", main_port=1)
    with pytest.raises(UserError, match="at least 1"):
        accelerate_launch_command(num_machines=0, machine_rank=0, processes_per_machine=8, main_ip="h", main_port=1)


def test_node_line_from_slurm_environment(tmp_path):
    """What each srun task builds from the variables SLURM gives it (here written out by hand)."""
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8"}
    args = [f"run_dir={tmp_path / 'run'}", "mixed_precision=bf16"]
    cmd, extra = node_launch_command(env, "gpu-node-017", args)
    assert Path(cmd[0]).name == "accelerate" and cmd[1] == "launch" and extra == {}
    assert cmd[cmd.index("--num_processes") + 1] == "16"
    assert cmd[cmd.index("--machine_rank") + 1] == "1"
    assert cmd[cmd.index("--main_process_ip") + 1] == "gpu-node-017"
    assert cmd[cmd.index("--main_process_port") + 1] == str(20000 + 4242)
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[-3].endswith("launch/train.py") and cmd[-2:] == args
    cpu_env = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "ARTSCALE_CPU_PROCESSES": "2", "ARTSCALE_MAIN_PORT": "31000"}
    cmd, extra = node_launch_command(cpu_env, "h", [f"run_dir={tmp_path / 'run'}"])
    assert extra == {"ACCELERATE_USE_CPU": "1"} and cmd[cmd.index("--num_processes") + 1] == "2"
    with pytest.raises(UserError, match="unknown config key"):
        node_launch_command(env, "h", ["no_such_key=1"])


def test_gpu_count_and_port_defaults():
    assert gpus_on_node({"ARTSCALE_GPUS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "8"}) == 4
    assert gpus_on_node({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert gpus_on_node({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert gpus_on_node({}) == 0
    assert main_port({"SLURM_JOB_ID": "123"}) == 20123 != main_port({"SLURM_JOB_ID": "124"})
    assert main_port({"ARTSCALE_MAIN_PORT": "29500", "SLURM_JOB_ID": "123"}) == 29500
